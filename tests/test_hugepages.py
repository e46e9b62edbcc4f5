import os
import subprocess
import sys

import pytest

from mmv_jax import hugepages


@pytest.fixture
def thp(tmp_path):
    def write(text):
        path = tmp_path / "enabled"
        path.write_text(text)
        return str(path)

    return write


def calls(environ, thp_path, accelerator_files=()):
    seen = []
    hugepages.reexec_with_hugepages(environ, lambda *a: seen.append(a), thp_path, accelerator_files)
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunable")
def test_reexecutes_once_with_the_tunable_when_the_kernel_wants_madvise(thp):
    seen = calls({"PATH": "/bin"}, thp("always [madvise] never\n"))
    assert len(seen) == 1
    exe, argv, env = seen[0]
    assert exe == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": hugepages.TUNABLE}
    assert calls(env, thp("always [madvise] never\n")) == []  # the new process stays


def test_leaves_the_process_alone_otherwise(thp, tmp_path):
    madvise = thp("always [madvise] never\n")
    assert calls({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise) == []  # the user's own
    assert calls({"MMV_HUGEPAGES": "0"}, madvise) == []
    assert calls({}, thp("[always] madvise never\n")) == []  # the kernel already does it
    assert calls({}, thp("always madvise [never]\n")) == []
    assert calls({}, str(tmp_path / "missing")) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunable")
def test_only_cpu_hosts_get_huge_pages(thp, tmp_path):
    madvise = thp("always [madvise] never\n")
    (tmp_path / "accel0").touch()
    chip = (str(tmp_path / "accel*"),)
    assert calls({}, madvise, chip) == []  # a TPU VM
    assert calls({"JAX_PLATFORMS": "tpu"}, madvise) == []
    assert calls({"JAX_PLATFORMS": "cuda,cpu"}, madvise) == []
    # JAX told to use the CPU on an accelerator host: the CPU's allocator is the cost again
    assert len(calls({"JAX_PLATFORMS": "cpu"}, madvise, chip)) == 1


def test_real_reexec_sets_the_variable_for_the_new_process():
    code = (
        "import os; from mmv_jax.hugepages import reexec_with_hugepages; "
        "reexec_with_hugepages(); print(os.environ.get('GLIBC_TUNABLES'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MMV_HUGEPAGES")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    wanted = (
        sys.platform.startswith("linux")
        and hugepages._thp_mode() == "madvise"
        and not hugepages.accelerator_host(env)
    )
    assert out == (hugepages.TUNABLE if wanted else "None")
