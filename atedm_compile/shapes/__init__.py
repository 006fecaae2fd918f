"""The captioned-shapes kit: the toy world (images of coloured shapes and their captions) the
shipped ``tiny-shapes`` models are trained and measured in, not tensor shapes. It is the
evaluation side: it uses the compiler core; the core never imports it.

- ``synthetic``: captions and images of coloured shapes and a detector that reads them back (the
  image metrics, PSNR, SSIM and the Frechet distance, are ``evaluate.image_metrics``').
- ``measures``: a small feature classifier (the Frechet distance's features) and where the kept
  tokens fall against the object's mask.
- ``trained``: writing a model folder (``config.json`` + ``model.safetensors``) as
  ``benchmarks/train_tiny_model.py`` trains it; ``models.load_trained_pipeline`` reads it.
"""
