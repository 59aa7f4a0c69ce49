"""The distillctl command line: thin Typer commands over library functions.

Heavy imports (torch, timm, onnx) happen inside the commands so ``--help`` stays fast. Each command
parses options, calls one library function and reports through ``report.execute`` (exit codes and
the ``--json`` document of contract.md).
"""
from __future__ import annotations

from typing import List, Optional

import typer

from .report import execute, show_progress


def _version(value: bool):
    if value:
        from . import __version__

        typer.echo(f"distillctl {__version__}")
        raise typer.Exit(0)


app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-architecture knowledge distillation: teacher -> student -> safetensors/ONNX/TensorRT.")


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    """Cross-architecture knowledge distillation: teacher -> student -> safetensors/ONNX/TensorRT."""


SourceArg = typer.Argument(None, help="recipe YAML file; with --resume, the run folder (default runs/latest)")
SetOpt = typer.Option(None, "--set", help="dotted recipe override KEY=VALUE (repeatable)")
OutOpt = typer.Option(None, "--out", help="run folder (default runs/<name>-<time>)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
JsonOpt = typer.Option(False, "--json", help="print one JSON document on stdout")
ResumeOpt = typer.Option(False, "--resume", help="continue a run from its own folder and recipe")
AmendOpt = typer.Option(False, "--amend", help="with --resume: allow --set to change optimisation keys "
                                               "(train.lr, train.grad_clip, train.epochs, ...); recorded in the manifest")


def _training_command(command: str, source, out, set_, resume, amend, device, json_out):
    def body():
        from . import flows

        run = flows.prepare(command, source, overrides=set_, out=out, resume=resume, amend=amend)
        progress = show_progress(json_out)
        if command == "run":
            work = lambda r: flows.full_run(r, device=device, resume=resume, progress=progress)  # noqa: E731
        elif command == "train":
            work = lambda r: flows.train_run(r, device=device, resume=resume, progress=progress)  # noqa: E731
        else:
            work = lambda r: flows.distill_run(r, device=device, resume=resume, progress=progress)  # noqa: E731
        return flows.execute(command, run, work, device=device)

    execute(command, json_out, body)


@app.command()
def run(source: Optional[str] = SourceArg, out: Optional[str] = OutOpt, set_: Optional[List[str]] = SetOpt,
        resume: bool = ResumeOpt, amend: bool = AmendOpt, device: str = DeviceOpt, json_out: bool = JsonOpt):
    """Train the teacher if needed, distil, evaluate, export (the recipe's formats) and benchmark."""
    _training_command("run", source, out, set_, resume, amend, device, json_out)


@app.command()
def train(source: Optional[str] = SourceArg, out: Optional[str] = OutOpt, set_: Optional[List[str]] = SetOpt,
          resume: bool = ResumeOpt, amend: bool = AmendOpt, device: str = DeviceOpt, json_out: bool = JsonOpt):
    """Train the recipe's student supervised (how a teacher or a student baseline is made)."""
    _training_command("train", source, out, set_, resume, amend, device, json_out)


@app.command()
def distill(source: Optional[str] = SourceArg, out: Optional[str] = OutOpt, set_: Optional[List[str]] = SetOpt,
            resume: bool = ResumeOpt, amend: bool = AmendOpt, device: str = DeviceOpt, json_out: bool = JsonOpt):
    """Distil the recipe's teacher into its student with the recipe's method."""
    _training_command("distill", source, out, set_, resume, amend, device, json_out)


@app.command("eval")
def eval_(target: Optional[str] = typer.Argument(None, help="run folder, .safetensors, .onnx or engine (default runs/latest)"),
          recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe giving the validation data"),
          device: str = DeviceOpt, json_out: bool = JsonOpt):
    """Top-1/top-5 of a run's student or an exported artifact on the recipe's validation split."""

    def body():
        from .evaluate import evaluate_target

        return evaluate_target(target, recipe, device=device)

    def human(doc):
        m = doc["metrics"]
        return (f"{doc['target']} ({doc['format']}, {doc['provider']}): top-1 {100 * m['top1']:.2f}% "
                f"top-5 {100 * m['top5']:.2f}% on {m['n']} {doc['dataset']} validation images")

    execute("eval", json_out, body, human)


@app.command()
def export(run: Optional[str] = typer.Argument(None, help="run folder (default runs/latest)"),
           format_: List[str] = typer.Option(..., "--format", help="safetensors | onnx | trt (repeatable)"),
           precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8"),
           calibration: Optional[str] = typer.Option(None, "--calibration",
                                                     help="INT8 calibration: minmax | entropy | percentile"),
           calibration_images: Optional[int] = typer.Option(None, "--calibration-images",
                                                            help="INT8: training images to calibrate on (default 256)"),
           dynamic_batch: Optional[str] = typer.Option(None, "--dynamic-batch", help="MIN:OPT:MAX"),
           opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset"),
           max_parity_diff: Optional[float] = typer.Option(
               None, "--max-parity-diff", help="gate: exit 3 when max |logit diff| vs PyTorch exceeds this "
                                               "(stated for FP32; FP16 artifacts get 200x)"),
           min_top1: Optional[float] = typer.Option(None, "--min-top1", help="gate: exit 3 when an artifact's "
                                                                             "top-1 is below this fraction"),
           max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="gate: exit 3 when the "
                                                          "deployed artifact's batch-1 p50 exceeds this"),
           device: str = DeviceOpt, json_out: bool = JsonOpt):
    """Export the bare student (no training-only heads) and check it against PyTorch."""

    def body():
        from .export import export_run
        from .run import Run

        formats = [f for item in format_ for f in item.split(",") if f]
        return export_run(Run.open(run), formats, precision=precision, dynamic_batch=dynamic_batch, opset=opset,
                          max_parity_diff=max_parity_diff, min_top1=min_top1, max_latency_ms=max_latency_ms,
                          device=device, calibration=calibration, calibration_images=calibration_images)

    execute("export", json_out, body)


@app.command()
def bench(targets: Optional[List[str]] = typer.Argument(None, help="run folders or artifacts (default runs/latest)"),
          batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="comma-separated, e.g. 1,32"),
          backends: Optional[str] = typer.Option(None, "--backends",
                                                 help="comma-separated: torch,torch_compile,onnxruntime,trt "
                                                      "(default: the recipe's bench.backends)"),
          warmup: Optional[int] = typer.Option(None, "--warmup", help="warm-up calls per backend"),
          iters: Optional[int] = typer.Option(None, "--iters", help="timed calls per backend and batch size"),
          threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch and ONNX Runtime"),
          device: str = DeviceOpt, json_out: bool = JsonOpt):
    """Latency (p50/p90/p99) and throughput of the student in each available runtime."""

    def body():
        from .errors import BadInput
        from .export.bench import run_bench

        sizes = None
        if batch_sizes:
            try:
                sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
            except ValueError:
                raise BadInput(f"--batch-sizes expects integers such as 1,32, got {batch_sizes!r}") from None
        names = [b for b in backends.split(",") if b.strip()] if backends else None
        return run_bench(list(targets or []), batch_sizes=sizes, backends=names, device=device, warmup=warmup,
                         iters=iters, threads=threads)

    execute("bench", json_out, body)


@app.command()
def validate(recipe: str = typer.Argument(..., help="recipe YAML file"), set_: Optional[List[str]] = SetOpt,
             json_out: bool = JsonOpt):
    """Check a recipe (and overrides) without running anything; prints the resolved recipe."""

    def body():
        from .recipe import load_recipe

        r = load_recipe(recipe, set_ or [])
        return {"recipe_hash": r.hash(), "name": r.name, "method": r.method.name, "resolved": r.model_dump(mode="json")}

    def human(doc):
        import yaml

        return f"recipe ok: {doc['name']} [{doc['recipe_hash']}]\n" + yaml.safe_dump(doc["resolved"], sort_keys=False)

    execute("validate", json_out, body, human)


@app.command()
def methods(json_out: bool = JsonOpt):
    """List the distillation methods with their papers and default parameters."""

    def body():
        from .methods import registry

        out = []
        for n in registry.names():
            cls = registry.get(n)
            params = {k: f.get_default(call_default_factory=True) for k, f in cls.Config.model_fields.items()}
            out.append({"name": n, "paper": cls.paper, "params": params})
        return {"methods": out}

    def human(doc):
        return "\n".join(f"{m['name']:8s} {m['paper']}\n         " +
                         ", ".join(f"{k}={v}" for k, v in m["params"].items()) for m in doc["methods"])

    execute("methods", json_out, body, human)


@app.command()
def doctor(json_out: bool = JsonOpt):
    """Versions, devices, and which ONNX Runtime providers and TensorRT actually load."""

    def body():
        from .doctor import doctor_report

        return doctor_report()

    def human(doc):
        import json

        return json.dumps(doc, indent=2, default=str)

    execute("doctor", json_out, body, human)


@app.command()
def compare(recipe: str = typer.Argument(..., help="recipe YAML file"),
            methods_: str = typer.Option("ce,kd,hcd", "--methods", help="comma-separated method names"),
            out: Optional[str] = OutOpt, set_: Optional[List[str]] = SetOpt, device: str = DeviceOpt,
            json_out: bool = JsonOpt):
    """Run one recipe once per method (same seed, data order, budget) and tabulate the results."""

    def body():
        from pathlib import Path

        from .compare import compare as compare_fn

        names = [m.strip() for m in methods_.split(",") if m.strip()]
        return compare_fn(recipe, names, list(set_ or []), Path(out) if out else None, device,
                          progress=show_progress(json_out))

    execute("compare", json_out, body, lambda d: d["table"] + f"\nrun folder: {d['run_dir']}")


def main():
    # Before torch is imported: idle OpenMP threads sleep instead of spinning. Spinning threads on a
    # machine shared with another busy process made every small op wait (benchmarks/threads.py: a
    # training step 9x slower; passive waits: 1.1x). An explicit OMP_WAIT_POLICY is left alone.
    import os
    import sys

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C while the parser was prompting
        code = 130
    except Exception as err:
        # Click's usage errors (typer vendors Click, so matched by what they offer, not by class)
        if not (callable(getattr(err, "show", None)) and callable(getattr(err, "format_message", None))):
            raise
        err.show()
        code = int(getattr(err, "exit_code", 2))
        if code and "--json" in sys.argv[1:]:  # still exactly one JSON document on stdout
            import json

            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
            sys.stdout.write(json.dumps({"command": command, "status": "error", "exit_code": code,
                                         "error": err.format_message()}) + "\n")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
