"""The node's results as DICOM objects: a Segmentation and a TID 1500 Structured Report.

One module per object, as highdicom lays itself out: :mod:`.seg` (a segment per lesion),
:mod:`.sr` (measurements per lesion and the study's classification), :mod:`.identity` (patient
and study attributes copied from the source, the producing equipment, deterministic UIDs),
:mod:`.codes` (every coded concept, with why it was chosen) and :mod:`.writer` (one call that
writes both for a job: :func:`dicom_node.results.writer.write_results`).

The objects follow the IHE AI Results (AIR) profile: they join the analysed study (same Study
Instance UID, patient and study attributes copied byte-exact), form new series, reference their
source images, identify the algorithm (family "Artificial Intelligence"), and are marked as not
verified by a clinician.
"""
