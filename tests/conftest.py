import os

# CPU-only default suite; multi-device tests spawn their own subprocess with XLA_FLAGS set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
