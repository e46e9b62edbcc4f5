"""Host-side data (numpy + Grain; never JAX): manifest -> readers -> transforms -> views ->
patchify -> packer -> :class:`mmv_jax.batch.PackedBatch`.

- ``manifest``   JSONL records, validated (``load_manifest``, ``write_manifest``, ``LABELS``)
- ``readers``    ``load_image(path) -> ImageRecord``; ``ImageReadError``; ``file_errors``
- ``transforms`` resize the long side (spacing-aware), X-ray min-max / CT window to [-1, 1];
                 ``load_preprocessed`` (one record -> its image, or ``ImageReadError``)
- ``views``      2 global + 8 local aspect-preserving crops, sides multiples of 14
- ``patches``    ``patchify``, ``make_view``
- ``packing``    first-fit decreasing into a few bucket shapes, automatic bucket sizing
- ``config``     every data knob (``default_config``, ``demo_config``) and static facts
- ``pipeline``   ``make_train_iterator``, ``make_eval_iterator`` (Grain, checkpointable)
- ``cache``      ``mmv-cache``: decode/resample/resize once to .npy + a cache manifest
- ``synthetic``  ``mmv-demo-data``: the built-in phantom demo dataset
"""
