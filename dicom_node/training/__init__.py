"""Synthetic data for training and testing: DICOM CT writers and chest-CT phantoms.

No real patient data can be used on the machines this project is built on, so every CT a test or
a training run sees is made here: :mod:`dicom_node.training.ctseries` writes a HU volume as a valid
DICOM CT series (or one Enhanced CT file) and :mod:`dicom_node.training.phantom` makes the volumes.
"""
