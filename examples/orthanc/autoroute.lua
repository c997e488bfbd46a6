-- dicom-node auto-routing for Orthanc (checked with Orthanc 1.10.1).
--
-- When a study becomes stable (no new instance for "StableAge" seconds), its chest CT series are
-- sent to the dicom-node modality in one asynchronous job (visible in Orthanc's Jobs page and in
-- GET /jobs). The node's own results (Manufacturer "dicom-node") and any SEG or SR series are
-- never routed, so the SEG and SR the node sends back do not loop.
--
-- A series is routed once as it stands: when it is routed, the time Orthanc last added an
-- instance to it (its LastUpdate) is noted in the series' user metadata "DicomNodeRouted", and
-- it is routed again only when it has changed since (a re-sent, extended or corrected series;
-- a series that arrives while the node analyses the others is routed at its own stable event).
--
-- Install: copy this file, name it in Orthanc's configuration, declare the node and the user
-- metadata there:
--   "LuaScripts": ["/etc/orthanc/dicom-node-autoroute.lua"],
--   "UserMetadata": { "DicomNodeRouted": 1024 },
--   "DicomModalities": { "node": { "AET": "DICOM_NODE", "Host": "10.0.0.20", "Port": 11112 } }
-- Orthanc keeps one OnStableStudy: if another script defines it too, merge the two.

-- Settings ----------------------------------------------------------------------------------------

-- The node's entry in "DicomModalities".
local TARGET_MODALITY = 'node'

-- Series whose Modality (0008,0060) is one of these are routed...
local ROUTED_MODALITIES = { CT = true }

-- ...when their Body Part Examined (0018,0015), in upper case, is one of these. Sites whose
-- scanners write THORAX or LUNG add them here.
local ROUTED_BODY_PARTS = { CHEST = true }

-- Route a series with no Body Part Examined, or an empty one (many scanners leave it out).
local ROUTE_MISSING_BODY_PART = true

-- The Manufacturer (0008,0070) the node writes into everything it produces.
local NODE_MANUFACTURER = 'dicom-node'

-- Series of these modalities are never routed, whoever made them.
local NEVER_ROUTED_MODALITIES = { SEG = true, SR = true }

-- One log line per stable study, saying what was routed or why nothing was.
local VERBOSE = true

-- The user metadata (declared in "UserMetadata") where a routed series keeps its LastUpdate.
local ROUTED_METADATA = 'DicomNodeRouted'

-- -------------------------------------------------------------------------------------------------

local function Trim(value)
  if value == nil then
    return ''
  end
  return (string.gsub(tostring(value), '^%s*(.-)%s*$', '%1'))
end

local function Log(studyId, message)
  if VERBOSE then
    print('dicom-node autoroute: study ' .. studyId .. ': ' .. message)
  end
end

-- The LastUpdate a series had when it was last routed ('' when never).
local function RoutedAt(seriesId)
  local names = RestApiGet('/series/' .. seriesId .. '/metadata')
  if names == nil then
    return ''
  end
  for _, name in ipairs(ParseJson(names)) do
    if name == ROUTED_METADATA then
      return RestApiGet('/series/' .. seriesId .. '/metadata/' .. ROUTED_METADATA) or ''
    end
  end
  return ''
end

local function IsNodeResult(tags)
  return Trim(tags['Manufacturer']) == NODE_MANUFACTURER
end

-- Returns true when the series is routed, else false and the reason.
local function Wanted(tags)
  local modality = string.upper(Trim(tags['Modality']))
  if IsNodeResult(tags) then
    return false, 'dicom-node result'
  end
  if NEVER_ROUTED_MODALITIES[modality] then
    return false, 'modality ' .. modality
  end
  if not ROUTED_MODALITIES[modality] then
    return false, 'modality ' .. (modality ~= '' and modality or 'missing')
  end
  local bodyPart = string.upper(Trim(tags['BodyPartExamined']))
  if bodyPart == '' then
    if ROUTE_MISSING_BODY_PART then
      return true
    end
    return false, 'no body part'
  end
  if not ROUTED_BODY_PARTS[bodyPart] then
    return false, 'body part ' .. bodyPart
  end
  return true
end

function OnStableStudy(studyId, tags, metadata)
  local answer = RestApiGet('/studies/' .. studyId .. '/series')
  if answer == nil then
    Log(studyId, 'not routed (the study is gone)')
    return
  end
  local series = ParseJson(answer)

  local route = {}
  local updated = {}
  local skipped = {}
  for _, s in ipairs(series) do
    local wanted, reason = Wanted(s['MainDicomTags'])
    if wanted and RoutedAt(s['ID']) == (s['LastUpdate'] or '') then
      wanted, reason = false, 'sent already'
    end
    if wanted then
      table.insert(route, s['ID'])
      table.insert(updated, s['LastUpdate'] or '')
    else
      table.insert(skipped, reason)
    end
  end

  if #route == 0 then
    Log(studyId, 'not routed (' .. table.concat(skipped, ', ') .. ')')
    return
  end

  local request = { Resources = route, Synchronous = false }
  local job = RestApiPost('/modalities/' .. TARGET_MODALITY .. '/store', DumpJson(request, true))
  if job == nil then
    Log(studyId, 'routing FAILED: Orthanc refused the store job (is "' .. TARGET_MODALITY ..
      '" in DicomModalities?)')
    return
  end
  -- noted once the job is queued: a failed job is Orthanc's to retry (Jobs page)
  for i, id in ipairs(route) do
    if RestApiPut('/series/' .. id .. '/metadata/' .. ROUTED_METADATA, updated[i]) == nil then
      Log(studyId, 'cannot note a routed series: declare "UserMetadata": { "' ..
        ROUTED_METADATA .. '": 1024 } in Orthanc\'s configuration')
    end
  end
  Log(studyId, 'routed ' .. #route .. ' series to ' .. TARGET_MODALITY .. ' (job ' ..
    ParseJson(job)['ID'] .. ')' ..
    (#skipped > 0 and ('; skipped ' .. table.concat(skipped, ', ')) or ''))
end
