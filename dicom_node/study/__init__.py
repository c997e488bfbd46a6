"""From spooled instances to a study: completion, headers, series selection, the CT volume.

- :mod:`~dicom_node.study.completion`: when a study has stopped arriving and becomes a job.
- :mod:`~dicom_node.study.headers`: each instance's header summary, read once, without pixels.
- :mod:`~dicom_node.study.selection`: which series the model analyses (rules from config), or
  :class:`~dicom_node.errors.StudySkipped` with every series' reasons.
- :mod:`~dicom_node.study.volume`: the chosen series' geometry checked from headers, then its
  pixels decoded once into a (z, y, x) HU volume.

Headers are read once (``read_headers``), the plan made once per series (``select_series``),
pixels read once (``load_volume(selection.chosen[0].plan)``).
"""
