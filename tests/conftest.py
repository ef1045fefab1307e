"""Test setup: 8 fake CPU devices, offline Hugging Face, one JAX compilation cache for the session,
and the fixtures that several test files share (each made once per session, xdist workers included)."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# TPU topologies are only compiled for here: the test process and `persllm compile` subprocesses
# may all load libtpu at once.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# One persistent JAX compilation cache for the session: the main process creates it before xdist
# starts its workers, and they and every `persllm` subprocess inherit it through the environment.
# Dozens of tests run the same tiny train step in fresh processes; each compiled it anew. A cached
# executable is the one the compiler made, so exact-resume and parity checks are unaffected. Set
# JAX_COMPILATION_CACHE_DIR yourself to keep a cache between sessions.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="persllm-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
# JAX caches only compilations over 1 s by default; the tiny models' steps compile faster than that.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Under xdist each worker, and the servers and subprocesses it starts, gets its share of the cores:
# torch takes a thread a core by default, so two workers' torch processes would oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))

import filelock  # noqa: E402
import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402
from tests.llm_servers import TransformersServer  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def made_once(tmp_path_factory, name: str, make):
    """The directory `name`, filled by `make(directory)` once for the whole session: under xdist
    the first worker to ask makes it while the others wait on a lock, then all read it."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the session's directory, above each worker's own
    out, done = root / name, root / f"{name}.done"
    with filelock.FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed making it left a part
            out.mkdir()
            make(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def smollm2_gguf():
    return hf_fixtures.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct dequantized from the offline GGUF into an HF directory (once)."""
    return made_once(
        tmp_path_factory,
        "smollm2_hf",
        lambda out: hf_fixtures.gguf_to_hf_dir(hf_fixtures.smollm2_gguf_path(), out),
    )


@pytest.fixture(scope="session")
def smollm2_transformers_server(smollm2_hf_dir, tmp_path_factory):
    """The real `transformers serve` on SmolLM2, on loopback, for every test file that needs an
    OpenAI-compatible annotator or judge (their tests carry the xdist group "transformers_serve",
    so one worker runs them all against this one server)."""
    server = TransformersServer(smollm2_hf_dir, log_path=tmp_path_factory.mktemp("tserve") / "serve.log")
    server.start()
    print(
        f"\n`{' '.join(server.command)}`: /v1/models after {server.startup_s:.1f}s, "
        f"warm after {server.ready_s:.1f}s"
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="session")
def sft_reference_run(tmp_path_factory):
    """`persllm sft` on the tiny config, 8 steps in one go on 8 devices (fsdp 8): the run the
    resume, mesh and process tests must reproduce."""
    from tests.train_runs import EIGHT_DEVICES, train

    return (
        made_once(tmp_path_factory, "sft_reference", lambda out: train("sft", out / "run", env=EIGHT_DEVICES))
        / "run"
    )


def _xdist_group(item) -> str | None:
    """The xdist group of a test (`--dist loadgroup` runs a group on one worker): tests that share a
    server share its group; tests of one file that share a module-scoped fixture stay together, so
    the fixture is made once."""
    if "smollm2_transformers_server" in item.fixturenames:
        return "transformers_serve"
    for name in item.fixturenames:
        definitions = item._fixtureinfo.name2fixturedefs.get(name)
        if definitions and definitions[-1].scope == "module":
            return item.module.__name__
    return None


# The longest work units (a test, or a group run on one worker) go first, in this order, so that
# under xdist no worker is left running a long one alone at the end. Measured: `--durations=25`.
LONGEST_FIRST = (
    "tests.test_readme",  # the demo at smoke scale: about 10 minutes
    "transformers_serve",  # build-data, the LLM client and the judge against one server: about 11
    "tests.test_train_dpo",
    "tests.test_serving",
    "tests.test_lora_training",
    "tests.test_model_families",  # SFT, resume, DPO and LoRA of a tiny Qwen3 and Gemma 3: about 5 minutes
    "tests.test_probes",  # the reference run scored, and a two-persona run trained: about 2 minutes
    "tests/test_llm_adaptive.py::test_the_adaptive_limit_sends_fewer_requests_and_settles",
    "tests/test_train.py::test_tensor_axis_across_two_processes_equals_one",
    "tests/test_qlora.py::test_a_qlora_run_trains_resumes_and_exports",
)


def _work_unit(item) -> str:
    group = item.get_closest_marker("xdist_group")
    return group.args[0] if group else item.nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_work_unit(item), len(rank)))  # stable: otherwise as collected
