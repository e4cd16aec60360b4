"""Layer 3, data: dataset builders (:mod:`.captioned_shapes`, :mod:`.image_captions`, webdataset
:mod:`.shards`) and :mod:`.input_pipeline` (globally sharded image batches and the seeded
embedding batches)."""
