"""The model and what it says: network, model folders, the inference engine, lesions.

- :mod:`~dicom_node.analysis.network`: :class:`LungCTNet`, a ResNet50 U-Net whose encoder also
  feeds an MLP giving a per-image cancer logit; the study-level rule (mean of the top-k image
  probabilities).
- :mod:`~dicom_node.analysis.weights`: a model folder (``model.yaml`` card and
  ``weights.safetensors``): :func:`load_model` and :func:`save_model`.
- :mod:`~dicom_node.analysis.inference`: :class:`InferenceEngine`, a (z, y, x) HU volume in,
  tumour probability map and image / study probabilities out.
- :mod:`~dicom_node.analysis.lesions`: :func:`find_lesions`, connected components of the
  thresholded map, measured (volume, axes, HU, position) and ordered by volume.

The submodules import torch; import them where the model is used, not where the node starts
receiving.
"""
