"""The captioned-shapes kit: the small world the shipped ``tiny-shapes`` models are trained and
measured in. It uses the compiler core; the core never imports it.

- ``synthetic``: captions and images of coloured shapes, a detector that reads them back, and the
  image metrics (PSNR, SSIM, Frechet distance).
- ``quality``: a small feature classifier (the Frechet distance's features) and where the kept
  tokens fall against the object's mask.
- ``trained``: writing a model folder (``config.json`` + ``model.safetensors``) as
  ``benchmarks/train_tiny_model.py`` trains it; ``models.load_trained_pipeline`` reads it.
"""
