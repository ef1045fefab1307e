"""`persllm pipeline`: the whole PersLLM method, end to end, from persona materials.

Steps, each a `persllm` command with its resolved config written to `<out_dir>/configs/`, so any
step can be rerun by hand:

  base        the base model with the stage tokens added (import-hf; a GGUF that is also the
              annotator is converted to <out_dir>/hf_from_gguf/ first, which the annotator loads)
  build-data  persona dialogues and preference pairs, annotated by an LLM served on loopback
  sft         personified conversational SFT, general chat data mixed in
  dpo         DPO on the mined cross-persona / cross-stage pairs, from the SFT model
  eval        base vs SFT vs SFT+DPO on the held-out split (the annotator is also the judge)
  export      the DPO model as a Hugging Face directory (export-hf)
  talk        two personified agents converse
  reload      transformers loads the export and answers one question per persona and stage

A finished step leaves `<out_dir>/steps/<step>.json`; rerunning the pipeline skips it. An
interrupted step resumes on its own terms: build-data from its LLM-call cache, training from its
last checkpoint, eval from its per-model answer files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from persllm_jax import configlib
from persllm_jax.configlib import ConfigError
from persllm_jax.io import offline_models
from persllm_jax.llm.endpoint import ENV_PREFIX
from persllm_jax.personas.materials import PERSONA_FILE, STAGE_PROMPTS, load_personas
from persllm_jax.pipeline import gguf_copy
from persllm_jax.pipeline.config import PipelineConfig, StepSection

log = logging.getLogger(__name__)

STEPS = ("base", "build-data", "sft", "dpo", "eval", "export", "talk", "reload")


class PipelineError(RuntimeError):
    """A step failed; the message names it and its log."""


class Pipeline:
    def __init__(self, cfg: PipelineConfig, config_path: str | Path | None = None):
        if cfg.annotator.server not in ("persllm", "transformers", "external"):
            raise ConfigError(
                f"annotator.server: {cfg.annotator.server!r} is not one of persllm, transformers, external"
            )
        if cfg.annotator.server == "external" and not cfg.annotator.base_url:
            raise ConfigError("annotator.base_url is required when annotator.server is external")
        self.cfg = cfg
        self.root = Path(config_path).resolve().parent.parent if config_path else Path.cwd()
        self.out = Path(cfg.out_dir).resolve()
        self.base_source = cfg.base_model or str(offline_models.smollm2_gguf())
        self.annotator_model = cfg.annotator.model or str(offline_models.smollm2_gguf())
        self.server = None
        self.timings: dict[str, float] = {}
        self.step_env: dict[str, str] = {}  # API keys for the steps' processes, never written down
        self.peak_rss_mb: dict[str, float] = {}  # per step: its process's peak resident memory
        self.command = f"persllm pipeline --config {config_path or 'CONFIG'}"  # what resumes it
        self.command_note = ""

    # -- paths -----------------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def repo_path(self, value: str) -> str:
        """A config path as given, or relative to the repository the config file lives in."""
        p = Path(value)
        if p.is_absolute() or p.exists():
            return str(p.resolve())
        return str((self.root / p).resolve())

    def personas_dir(self) -> str:
        """The persona folders every step reads: the configured ones, or their copy in
        `<out_dir>/personas` with the pipeline's `stage_prompt` (written on first use)."""
        source = self.repo_path(self.cfg.personas_dir)
        if not self.cfg.stage_prompt:
            return source
        if self.cfg.stage_prompt not in STAGE_PROMPTS:
            raise ConfigError(
                f"stage_prompt: {self.cfg.stage_prompt!r} is not one of {', '.join(STAGE_PROMPTS)}"
            )
        target = self.path("personas")
        if not target.is_dir():
            staging = self.path("personas.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            for yaml_path in staging.glob(f"*/{PERSONA_FILE}"):
                text = re.sub(r"(?m)^stage_prompt:.*\n", "", yaml_path.read_text())
                yaml_path.write_text(f"stage_prompt: {self.cfg.stage_prompt}\n{text}")
            load_personas(staging)  # what the steps will read, checked before any step runs
            staging.rename(target)
        return str(target)

    # -- running steps ---------------------------------------------------------------------------

    def _done_marker(self, step: str) -> Path:
        return self.path("steps", f"{step}.json")

    def _persllm(self, step: str, *args: str) -> None:
        """Run a `persllm` command in its own process (each releases its memory when done)."""
        log_path = self.path("logs", f"{step}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "persllm_jax.cli", *args]
        print(f"[pipeline] {step}: persllm {' '.join(args)}  (log: {log_path})", flush=True)
        with open(log_path, "ab") as log_file:
            env = {**os.environ, **self.step_env}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                text = line.decode(errors="replace").rstrip()
                if text and not text.startswith(" ") and "it/s]" not in text and "s/it]" not in text:
                    print(f"  {text[-200:]}", flush=True)
            # wait4 gives this child's own resource use: its peak resident memory
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            # Linux reports KiB; a step of several commands keeps the largest
            self.peak_rss_mb[step] = max(self.peak_rss_mb.get(step, 0.0), round(usage.ru_maxrss / 1024, 1))
            if proc.returncode < 0:  # killed: the step's own log just stops, so say why here
                message = self._killed_message(step, -proc.returncode, log_path)
                log_file.write(f"\n[pipeline] {message}\n".encode())
                raise PipelineError(message)
        if proc.returncode != 0:
            raise PipelineError(
                f"step {step} failed (exit {proc.returncode}); see {log_path}. Once its cause is fixed, "
                f"the same command resumes{self.command_note}: {self.command}"
            )

    def _killed_message(self, step: str, signum: int, log_path: Path) -> str:
        """Which signal ended a step, its likely cause, the memory the step had reached, and the
        command that resumes the pipeline."""
        from persllm_jax.train.attempts import killed_cause, of_the_machine

        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        resumes = "finished steps are skipped"
        checkpoint = _latest_checkpoint(self.path(step))
        if checkpoint is not None:
            resumes += f" and {step} resumes from its checkpoint of step {checkpoint}"
        elif step in ("sft", "dpo"):
            resumes += f" and {step} starts again (it had saved no checkpoint yet)"
        elif step == "build-data":
            resumes += " and build-data keeps every annotation already in its LLM-call cache"
        return (
            f"step {step} was killed by {name}: {killed_cause(name)}. Its peak memory was "
            f"{_gib(self.peak_rss_mb[step])}{of_the_machine()}; its log: {log_path}. Running the same command "
            f"again resumes ({resumes}){self.command_note}: {self.command}"
        )

    def _record_invocation(self, started: float, finished: bool) -> None:
        """Every invocation's wall time, finished or not, so the summary adds up the whole run."""
        path = self.path("steps", "invocations.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"started": started, "seconds": round(time.time() - started, 1), "finished": finished}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _invocations(self) -> list[dict]:
        path = self.path("steps", "invocations.jsonl")
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in lines if line.strip()]

    def _step_records(self) -> dict[str, dict]:
        """Each finished step's time and peak memory, from its marker (whichever run finished it)."""
        records = {}
        for step in STEPS:
            marker = self._done_marker(step)
            if marker.is_file():
                records[step] = json.loads(marker.read_text())
        return records

    def _write_config(self, step: str, data: dict, cls, overrides) -> Path:
        data = configlib.apply_overrides(data, overrides)
        configlib.from_dict(cls, data, step)  # fail here, naming the key, not inside the subprocess
        data = self._keys_to_environment(step, data)
        path = self.path("configs", f"{step}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def _keys_to_environment(self, step: str, data: dict) -> dict:
        """API keys never reach a file: each is moved into an environment variable of the step's
        process, and the written config says `api_key: env:NAME`."""
        data = dict(data)
        for section, value in list(data.items()):
            if not isinstance(value, dict):
                continue
            key = value.get("api_key")
            if isinstance(key, str) and key and not key.startswith(ENV_PREFIX):
                name = f"PERSLLM_{step}_{section}_API_KEY".upper().replace("-", "_")
                self.step_env[name] = key
                data[section] = {**value, "api_key": f"{ENV_PREFIX}{name}"}
        return data

    def _base_yaml(self, section: StepSection) -> dict:
        if not section.config:
            return {}
        path = Path(self.repo_path(section.config))
        try:
            return yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err

    # -- the annotator / judge server ------------------------------------------------------------

    def annotator_url(self) -> tuple[str, str]:
        a = self.cfg.annotator
        if a.server == "external":
            return a.base_url, a.model_name
        if self.server is None:
            self._start_server()
        return self.server.base_url, self.server.model_name

    def _start_server(self) -> None:
        a = self.cfg.annotator
        # Appended to, as the step logs are: the eval step's server and a rerun keep the earlier output.
        log_path = self.path("logs", "annotator_server.log")
        model = self._hf_dir_of(self.annotator_model, "annotator-export")
        print(f"[pipeline] starting the annotator: {a.server} serve {model}", flush=True)
        if a.server == "persllm":
            from persllm_jax.inference.serving import ServerProcess

            self.server = ServerProcess(
                str(model),
                model_name=a.model_name,
                max_batch=a.max_batch,
                log_path=log_path,
                append_log=True,
            ).start()
        else:
            from persllm_jax.llm.transformers_server import TransformersServer

            self.server = TransformersServer(model, log_path=log_path, append_log=True).start()

    def _hf_dir_of(self, source: str, step: str) -> Path:
        """A GGUF file as its HF copy in `<out_dir>/hf_from_gguf/` (made by `step` if missing, see
        gguf_copy.py); other sources as they are."""
        if not gguf_copy.is_gguf(source):
            return Path(source)

        def export(out: Path) -> None:
            self._persllm(step, "export-hf", str(source), str(out))

        return gguf_copy.hf_copy(source, self.path("hf_from_gguf"), export)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # -- the steps -------------------------------------------------------------------------------

    def step_base(self) -> None:
        from persllm_jax.personas.materials import stage_tokens

        tokens = stage_tokens(load_personas(self.personas_dir()))
        source = self.base_source
        if self.cfg.annotator.server != "external" and gguf_copy.same_file(source, self.annotator_model):
            # by default the base model is the annotator's file: dequantised once, here
            source = str(self._hf_dir_of(source, "base"))
        self._persllm(
            "base",
            "import-hf",
            source,
            str(self.path("base_model")),
            "--add-tokens",
            ",".join(tokens),
        )

    def step_build_data(self) -> None:
        base_url, model_name = self.annotator_url()
        data = self._base_yaml(self.cfg.build)
        data.update(personas_dir=self.personas_dir(), out_dir=str(self.path("data")))
        data["llm"] = {**data.get("llm", {}), "base_url": base_url, "model": model_name}
        data["general_data"] = {**data.get("general_data", {}), "path": self.repo_path(self.cfg.general_data)}
        from persllm_jax.builder.config import BuildConfig

        config = self._write_config("build-data", data, BuildConfig, self.cfg.build.overrides)
        self._persllm("build-data", "build-data", "--config", str(config))

    def _train_config(self, step: str, section: StepSection, model_path: Path, sources: list[dict]) -> Path:
        from persllm_jax.train.config import RunConfig

        data = self._base_yaml(section)
        data["run_dir"] = str(self.path(step))
        data["model"] = {**data.get("model", {}), "path": str(model_path)}
        data["data"] = {**data.get("data", {}), "sources": sources}
        # the probes during training ask with the persona prompts the data was built with
        data["eval"] = {**data.get("eval", {}), "personas_dir": self.personas_dir()}
        return self._write_config(step, data, RunConfig, section.overrides)

    def step_sft(self) -> None:
        # dialogues.jsonl already holds the general chats build-data mixed in (general_data.repeats
        # per persona dialogue), so the paper's x5 applies to the whole file.
        sources = [{"path": str(self.path("data", "dialogues.jsonl")), "repeats": 5, "split": "train"}]
        config = self._train_config("sft", self.cfg.sft, self.path("base_model"), sources)
        self._train("sft", config)

    def step_dpo(self) -> None:
        sources = [{"path": str(self.path("data", "pairs.jsonl")), "repeats": 1, "split": "train"}]
        config = self._train_config("dpo", self.cfg.dpo, self.path("sft"), sources)
        self._train("dpo", config)

    def _train(self, step: str, config: Path) -> None:
        """Run a training step; it is done only when its run reached `train.max_steps`. A trainer
        stopped by SIGTERM (a preemption) checkpoints and exits 0, and the steps after it must
        not start from a half-trained model."""
        from persllm_jax.train.config import RunConfig

        self._persllm(step, step, "--config", str(config))
        max_steps = configlib.load(RunConfig, config).train.max_steps
        reached = _latest_checkpoint(self.path(step))
        if reached != max_steps:
            raise PipelineError(
                f"step {step} stopped at step {reached} of {max_steps} (a SIGTERM, or train.stop_after) "
                f"and is not done; the same command resumes it from there{self.command_note}: {self.command}"
            )

    def step_eval(self) -> None:
        from persllm_jax.evaluation.config import EvalConfig

        base_url, model_name = self.annotator_url()
        data = self._base_yaml(self.cfg.eval)
        data.update(
            out_dir=str(self.path("eval")),
            title="PersLLM demo: base vs SFT vs SFT+DPO",
            models=[
                {"name": "base", "path": str(self.path("base_model"))},
                {"name": "sft", "path": str(self.path("sft")), "run_dir": str(self.path("sft"))},
                {"name": "dpo", "path": str(self.path("dpo")), "run_dir": str(self.path("dpo"))},
            ],
        )
        data["data"] = {
            **data.get("data", {}),
            "dialogues": str(self.path("data", "dialogues.jsonl")),
            "pairs": str(self.path("data", "pairs.jsonl")),
            "personas_dir": self.personas_dir(),
        }
        data["judge"] = {**data.get("judge", {}), "base_url": base_url, "model": model_name}
        config = self._write_config("eval", data, EvalConfig, self.cfg.eval.overrides)
        self._persllm("eval", "eval", "--config", str(config))

    def step_export(self) -> None:
        self._persllm("export", "export-hf", str(self.path("dpo")), str(self.path("hf_model")))

    def step_talk(self) -> None:
        from persllm_jax.inference.talk import TalkConfig

        t = self.cfg.talk
        data = {
            "out_dir": str(self.path("talk")),
            "agents": [{"model": str(self.path("dpo")), **a} for a in t.agents],
            "topic": t.topic,
            "turns": t.turns,
            "max_new_tokens": t.max_new_tokens,
            "personas_dir": self.personas_dir(),
        }
        config = self._write_config("talk", data, TalkConfig, ())
        self._persllm("talk", "talk", "--config", str(config))

    def step_reload(self) -> None:
        from persllm_jax.pipeline.reload_check import answer_with_transformers

        out = answer_with_transformers(
            self.path("hf_model"),
            self.personas_dir(),
            self.cfg.reload.question,
            self.cfg.reload.max_new_tokens,
            self.path("hf_answers"),
        )
        print(Path(out["md"]).read_text(), flush=True)

    # -- driver ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Path]:
        started = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        finished = False
        try:
            for step in STEPS:
                marker = self._done_marker(step)
                if marker.exists():
                    print(f"[pipeline] {step}: done earlier, skipped", flush=True)
                    continue
                if step == "sft":
                    self.stop_server()  # the two CPU cores go to training, not an idle server
                t0 = time.time()
                getattr(self, "step_" + step.replace("-", "_"))()
                self.timings[step] = round(time.time() - t0, 1)
                if step not in self.peak_rss_mb:  # ran in this process: its peak so far bounds it
                    self.peak_rss_mb[step] = round(
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                    )
                marker.parent.mkdir(parents=True, exist_ok=True)
                record = {"seconds": self.timings[step], "peak_rss_mb": self.peak_rss_mb[step]}
                marker.write_text(json.dumps({**record, "finished": time.time()}))
                print(
                    f"[pipeline] {step}: finished in {self.timings[step]:.0f} s, "
                    f"peak memory {_gib(self.peak_rss_mb[step])}",
                    flush=True,
                )
                if step == "eval":
                    self.stop_server()
            finished = True
        finally:
            self.stop_server()
            self._record_invocation(started, finished)
        results = {
            "report": self.path("eval", "report.md"),
            "model": self.path("hf_model"),
            "transcripts": self.path("talk", "transcript.md"),
            "answers": self.path("hf_answers", "answers.md"),
        }
        total = time.time() - started
        invocations = self._invocations()
        overall = sum(i["seconds"] for i in invocations)
        steps = self._step_records()
        self.path("steps", "timings.json").write_text(
            json.dumps(
                {
                    **{step: r["seconds"] for step, r in steps.items()},
                    "total_this_run": total,
                    "total_all_runs": overall,
                    "invocations": len(invocations),
                    "peak_rss_mb": {step: r["peak_rss_mb"] for step, r in steps.items()},
                }
            )
        )
        print(f"\n[pipeline] finished in {total / 60:.1f} min", end="")
        if len(invocations) > 1:
            print(
                f" (this run); {overall / 60:.1f} min over all {len(invocations)} runs of {self.out}", end=""
            )
        print()
        for step, record in steps.items():
            print(
                f"  {step:<11} {record['seconds'] / 60:5.1f} min, peak memory {_gib(record['peak_rss_mb'])}"
            )
        print(f"  report:      {_shown(results['report'])}")
        from persllm_jax.evaluation.probes.run import report_probe_lines  # loads JAX: only now

        for line in report_probe_lines(self.path("eval", "report.json")):
            print(f"  probes:      {line}")
        print(f"  model (HF):  {_shown(results['model'])}")
        print(f"  transcripts: {_shown(results['transcripts'])}")
        print(f"  HF answers:  {_shown(results['answers'])}")
        return results


def _gib(mib: float) -> str:
    """A peak resident memory recorded in MiB, as printed: `7.77 GiB`."""
    return f"{mib / 1024:.2f} GiB"


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _redacted(argument: str) -> str:
    """An argument with any API key's value replaced by KEY (a resume command is printed and logged)."""
    return re.sub(r"(api_key=)[^,\]\s\"']+", r"\1KEY", argument)


def _latest_checkpoint(run_dir: Path) -> int | None:
    """The last finished checkpoint step of a training run directory (Orbax renames a step's
    directory into place only when it is complete)."""
    steps = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.is_dir() and p.name.isdigit()]
    return max(steps, default=None)


def run_pipeline(config_path: str, overrides=()) -> dict[str, Path]:
    cfg = configlib.load(PipelineConfig, config_path, overrides)
    pipeline = Pipeline(cfg, config_path)
    shown = [shlex.quote(_redacted(a)) for a in [str(config_path), *overrides]]
    pipeline.command = " ".join(["persllm", "pipeline", "--config", *shown])
    if any("api_key=" in o for o in overrides):
        pipeline.command_note = " (API keys are shown as KEY: give yours again)"
    return pipeline.run()
