"""Evaluation: zero-shot accuracy (``zero_shot``, ``shapes_eval``), sample metrics — CLIP score,
Fréchet distance, diversity, the shapes judge's fidelity and binding scores (``metrics``) —,
the FID Inception-v3 feature extractor for user-supplied weights (``inception``), and the
zero-shot MS-COCO FID of the papers, chunked and resumable (``coco``)."""
