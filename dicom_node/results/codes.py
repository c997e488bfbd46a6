"""Coded concepts used in the node's DICOM Segmentation and TID 1500 Structured Report.

Every concept is taken from pydicom's code dictionary (``pydicom.sr.codedict.codes``, which
follows PS3.16) where it is there, so that its meaning is spelled the way the standard spells
it; the few that are not are written as :class:`highdicom.sr.CodedConcept` with their SNOMED CT
identifier and preferred term. Each is listed here once, with why it was chosen.

Segmentation (PS3.3 C.8.20.4, Segment Description Macro)
    ============================  ==================  =========================================
    concept                       code                role
    ============================  ==================  =========================================
    Morphologically abnormal      SCT 49755003        Segmented Property Category (CID 7150)
    structure
    Neoplasm                      SCT 108369006       Segmented Property Type (CID 7151); also
                                                      the lesion's finding type in the SR
    Lung                          SCT 39607008        Anatomic Region; the SR's finding site
    Artificial Intelligence       DCM 123110          Algorithm Family (CID 7162)
    ============================  ==================  =========================================

Structured Report (TID 1500 / 1411 / 1501 / 1419)
    ============================  ==================  =========================================
    Computed tomography of chest  SCT 169069000       Procedure Reported (CID 100 is extensible)
    Right / Left                  SCT 24028007 /      Laterality of the finding site (CID 244)
                                  SCT 7771000
    Volume                        SCT 118565006       lesion volume, mm3 (CID 7469)
    Long axis / Short axis        SCT 103339001 /     in-plane diameters, mm (CID 7469)
                                  SCT 103340004
    Attenuation Coefficient       DCM 112031          with derivation Mean (SCT 373098007) or
                                                      Maximum (SCT 56851009), in HU (CID 7180
                                                      with CID 7464, as TID 1419 pairs them)
    Probability of cancer         DCM 111047          the model's probability, unit "1"
    Threshold Value               DCM 122411          the study threshold the classification used
    Number of lesions             SCT 246206008       lesions found in the study, unit "1"
    Malignant neoplastic disease  SCT 363346000       study-level qualitative evaluation whose
                                                      value is Present (SCT 52101004, the model
                                                      calls the study cancerous) or Absent
                                                      (SCT 272519000, not cancerous)
    Lesion                        SCT 52988006        qualitative evaluation "lesion: Present /
                                                      Absent" (Absent: "no lesion detected")
    ============================  ==================  =========================================

Units are UCUM: ``mm3``, ``mm``, ``[hnsf'U]`` and ``1`` ("no units", for probabilities and
counts).
"""

from __future__ import annotations

import enum
from typing import Final

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ABSENT",
    "ARTIFICIAL_INTELLIGENCE",
    "ATTENUATION_COEFFICIENT",
    "CT_OF_CHEST",
    "CUBIC_MILLIMETER",
    "HOUNSFIELD_UNIT",
    "LESION",
    "LONG_AXIS",
    "LUNG",
    "MALIGNANT_NEOPLASTIC_DISEASE",
    "MAXIMUM",
    "MEAN",
    "MILLIMETER",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "NEOPLASM",
    "NO_UNITS",
    "NUMBER_OF_LESIONS",
    "PRESENT",
    "PROBABILITY_OF_CANCER",
    "SHORT_AXIS",
    "THRESHOLD_VALUE",
    "TITLE",
    "VOLUME",
    "Laterality",
    "StudyClassification",
]


def _concept(code: Code) -> CodedConcept:
    """A :class:`highdicom.sr.CodedConcept` from a pydicom ``Code``."""
    return CodedConcept.from_code(code)


# ------------------------------------------------------------------ segmentation
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Final = _concept(codes.SCT.MorphologicallyAbnormalStructure)
NEOPLASM: Final = _concept(codes.SCT.Neoplasm)
LUNG: Final = _concept(codes.SCT.Lung)
ARTIFICIAL_INTELLIGENCE: Final = _concept(codes.cid7162.ArtificialIntelligence)

# ------------------------------------------------------------------ report
TITLE: Final = _concept(codes.cid7021.ImagingMeasurementReport)
CT_OF_CHEST: Final = CodedConcept("169069000", "SCT", "Computed tomography of chest")
VOLUME: Final = _concept(codes.SCT.Volume)
LONG_AXIS: Final = _concept(codes.SCT.LongAxis)
SHORT_AXIS: Final = _concept(codes.SCT.ShortAxis)
ATTENUATION_COEFFICIENT: Final = _concept(codes.DCM.AttenuationCoefficient)
MEAN: Final = _concept(codes.SCT.Mean)
MAXIMUM: Final = _concept(codes.SCT.Maximum)
PROBABILITY_OF_CANCER: Final = _concept(codes.DCM.ProbabilityOfCancer)
THRESHOLD_VALUE: Final = _concept(codes.DCM.ThresholdValue)
NUMBER_OF_LESIONS: Final = _concept(codes.SCT.NumberOfLesions)
MALIGNANT_NEOPLASTIC_DISEASE: Final = CodedConcept(
    "363346000", "SCT", "Malignant neoplastic disease"
)
LESION: Final = _concept(codes.SCT.Lesion)
PRESENT: Final = _concept(codes.SCT.Present)
ABSENT: Final = _concept(codes.SCT.Absent)

# ------------------------------------------------------------------ units (UCUM)
CUBIC_MILLIMETER: Final = _concept(codes.UCUM.CubicMillimeter)
MILLIMETER: Final = _concept(codes.UCUM.Millimeter)
HOUNSFIELD_UNIT: Final = _concept(codes.UCUM.HounsfieldUnit)
NO_UNITS: Final = _concept(codes.UCUM.NoUnits)


class Laterality(enum.Enum):
    """Side of the patient a lesion lies on (CID 244 values used here).

    The patient coordinate system is LPS: +x points to the patient's **left**, so a lesion whose
    centroid has a smaller x than the patient's midline lies on the patient's **right**.
    """

    RIGHT = "24028007"
    LEFT = "7771000"

    @property
    def code(self) -> CodedConcept:
        """The coded concept (SCT)."""
        return _concept(codes.SCT.Right if self is Laterality.RIGHT else codes.SCT.Left)


class StudyClassification(enum.Enum):
    """The model's study-level verdict, as the value of "Malignant neoplastic disease"."""

    CANCEROUS = "cancerous"
    NON_CANCEROUS = "non-cancerous"

    @property
    def code(self) -> CodedConcept:
        """Present (cancerous) or Absent (non-cancerous), SCT."""
        return PRESENT if self is StudyClassification.CANCEROUS else ABSENT
