"""Models (``models``: a flat parameter buffer and named views), optimizers (``optimizer``),
the sharded optimizer step (``zero``), model files (``modelfile``) and predictions
(``predict``)."""
