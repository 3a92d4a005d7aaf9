"""`ldm-serve`: the embedded model (or your models) behind the AUTOMATIC1111 and OpenAI image APIs, on
Ray Serve — one command locally, the same app on a Ray cluster.

`app_builder(args)` is a Ray Serve application builder: the YAML that `ldm-serve --write-config` prints
runs with `ldm-serve --config serve.yaml` and with Ray's own `serve run serve.yaml` / `serve deploy`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  ldm-serve                                              # the embedded model on http://127.0.0.1:7860
  ldm-serve --model sd15.safetensors --model ./sd21-folder --replicas 2
  ldm-serve --model sd15=./v1-5.safetensors --autoscale 1,4 --api-key SECRET --host 0.0.0.0
  ldm-serve --address ray://head-node:10001 --model /shared/sd15.safetensors   # onto a Ray cluster
  ldm-serve --write-config > serve.yaml && ldm-serve --config serve.yaml
"""
APP_NAME = "ldm_engine"
DEFAULTS = {"models": [], "backend": "torch", "dtype": None, "replicas": 1, "autoscale": None, "threads": None,
            "max_batch_size": 8, "batch_wait_ms": 50.0, "replica_cpus": 1.0, "max_ongoing_requests": 16, "max_queued_requests": 64,
            "lora_dirs": [], "embedding_dirs": [], "api_key": None, "basic_auth": None, "limits": {}}


def _model(text: str) -> dict:
    """PATH or NAME=PATH -> {"name", "path"} (the name defaults to the file or folder name)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = None, text
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"model {path!r} does not exist; give a checkpoint file or diffusers folder")
    return {"name": name or None, "path": str(Path(path).resolve())}


def _autoscale(text: str) -> list[int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale takes MIN,MAX replicas such as 1,4, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return [low, high]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-serve", description="Serve latent diffusion models over HTTP on Ray Serve "
                                "(AUTOMATIC1111 /sdapi/v1, OpenAI /v1/images, /v1/jobs).", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=_model, action="append", default=[], metavar="[NAME=]PATH",
                   help="a checkpoint file or diffusers folder to serve (repeatable; the first is the default; "
                        "none: the embedded shapes model)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "openvino", "tensorrt"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: the backend's own")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="replicas per model (default 1)")
    scale.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN,MAX",
                       help="autoscale each model between MIN and MAX replicas on its queue length")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to deploy onto (ray://host:10001 or auto; default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--config", type=Path, help="a Ray Serve config file (see --write-config) instead of the flags")
    p.add_argument("--write-config", action="store_true", help="print the Ray Serve config for these flags and exit")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the replicas' INFO logs")
    p.add_argument("--api-key", default=os.environ.get("LDM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (the OpenAI way; default LDM_API_KEY)")
    p.add_argument("--basic-auth", default=None, metavar="USER:PASS", help="require HTTP basic auth (A1111's --api-auth)")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per batched UNet run (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="how long a batch waits to fill (default 50)")
    p.add_argument("--max-ongoing", type=int, default=16, help="requests a replica holds at once (default 16)")
    p.add_argument("--max-queued", type=int, default=64,
                   help="requests queued per model beyond that before 503/429 (default 64)")
    p.add_argument("--threads", type=int, default=None, help="compute threads per replica (default: all cores)")
    p.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per model replica (default 1; it computes with --threads regardless)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="folder for <lora:NAME:w> tags")
    p.add_argument("--embedding-dir", action="append", default=[], metavar="DIR", help="textual-inversion folder")
    p.add_argument("--max-pixels", type=int, default=None, help="largest width*height served (default 1024*1024)")
    p.add_argument("--max-steps", type=int, default=None, help="most steps per request (default 150)")
    p.add_argument("--max-images", type=int, default=None, help="most images per request (default 16)")
    return p


def args_from_flags(ns) -> dict:
    """The application's arguments (the `args` of its Ray Serve config) from parsed flags."""
    limits = {k: v for k, v in (("max_pixels", ns.max_pixels), ("max_steps", ns.max_steps),
                                ("max_images", ns.max_images)) if v is not None}
    return {"models": ns.model, "backend": ns.backend, "dtype": ns.dtype, "replicas": ns.replicas,
            "autoscale": ns.autoscale, "threads": ns.threads, "replica_cpus": ns.replica_cpus, "max_batch_size": ns.max_batch_size,
            "batch_wait_ms": ns.batch_wait_ms, "max_ongoing_requests": ns.max_ongoing,
            "max_queued_requests": ns.max_queued, "lora_dirs": ns.lora_dir, "embedding_dirs": ns.embedding_dir,
            "api_key": ns.api_key, "basic_auth": ns.basic_auth, "limits": limits}


def app_builder(args: dict):
    """Ray Serve application builder: one ModelServer deployment per model behind the ingress."""
    from .deployment import ModelServer
    from .server import Ingress

    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown ldm-serve application args {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    a = {**DEFAULTS, **args}
    if a["max_ongoing_requests"] < a["max_batch_size"]:
        raise ValueError(f"max_ongoing_requests ({a['max_ongoing_requests']}) must be >= max_batch_size "
                         f"({a['max_batch_size']}), or batches can never fill")
    models = a["models"] or [{"name": None, "path": None}]
    handles, names = {}, []
    for i, m in enumerate(models):
        name = m.get("name") or (Path(m["path"]).stem if m.get("path") and Path(m["path"]).is_file()
                                 else Path(m["path"]).name if m.get("path") else "shapes-ldm")
        if name in handles:
            raise ValueError(f"two models are named {name!r}; name them with --model NAME=PATH")
        spec = {"path": m.get("path"), "name": name, "backend": a["backend"], "dtype": a["dtype"],
                "lora_dirs": a["lora_dirs"], "embedding_dirs": a["embedding_dirs"], "threads": a["threads"]}
        scaling = ({"autoscaling_config": {"min_replicas": a["autoscale"][0], "max_replicas": a["autoscale"][1],
                                           "target_ongoing_requests": a["max_batch_size"]}}
                   if a["autoscale"] else {"num_replicas": a["replicas"]})
        deployment = ModelServer.options(name=f"model-{i}-{name}", max_ongoing_requests=a["max_ongoing_requests"],
                                         max_queued_requests=a["max_queued_requests"],
                                         ray_actor_options={"num_cpus": a["replica_cpus"]}, **scaling)
        handles[name] = deployment.bind(spec, a["max_batch_size"], a["batch_wait_ms"] / 1000.0)
        names.append(name)
    return Ingress.bind(handles, names[0], a["api_key"], a["basic_auth"], a["limits"])


def write_config(args: dict, host: str, port: int) -> str:
    import yaml

    config = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
              "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "ldm_engine.serve.cli:app_builder",
                                "args": args}]}
    return yaml.safe_dump(config, sort_keys=False)


def read_config(path: Path) -> tuple[dict, list[dict]]:
    """(http_options, applications) from a Ray Serve config file, checked against Ray's own schema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    except Exception as e:
        raise ValueError(f"{path} is not a Ray Serve config: {e}") from None
    http = schema.http_options.model_dump(exclude_unset=True) if schema.http_options else {}
    return http, [app.model_dump(exclude_unset=True) for app in schema.applications]


def start(args: dict, host: str = "127.0.0.1", port: int = 7860, address: str | None = None,
          applications: list[dict] | None = None, verbose: bool = False) -> str:
    """Start Ray (or join `address`), start Serve's HTTP proxy on host:port and run the app; returns its URL.
    `verbose`: Ray's and the replicas' INFO logs on this console (default: warnings and errors only)."""
    import importlib

    import ray
    from ray import serve

    from ray.serve.schema import LoggingConfig

    from .ray_env import init_ray

    if not ray.is_initialized():
        init_ray(address, include_dashboard=False, configure_logging=False, log_to_driver=verbose)
    serve.start(http_options={"host": host, "port": port},
                logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"))
    for app in applications or [{"name": APP_NAME, "route_prefix": "/", "args": args}]:
        builder = app_builder
        if app.get("import_path"):
            module, _, attr = app["import_path"].partition(":")
            builder = getattr(importlib.import_module(module), attr)
        serve.run(builder(app.get("args", {})), name=app.get("name", APP_NAME), route_prefix=app.get("route_prefix", "/"))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    args = args_from_flags(ns)
    if ns.write_config:
        print(write_config(args, ns.host, ns.port), end="")
        return 0
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        print("ldm-serve: error: Ray Serve is not installed: pip install 'ldm_engine[serve]'", file=sys.stderr)
        return 2
    host, port, apps = ns.host, ns.port, None
    try:
        if ns.config:
            http, apps = read_config(ns.config)
            host, port = http.get("host", host), http.get("port", port)
        url = start(args, host, port, ns.address, apps, ns.verbose)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"ldm-serve: error: {e}", file=sys.stderr)
        return 2
    print(f"ldm-serve: serving on {url}  (API docs: {url}/docs; A1111 API: {url}/sdapi/v1; OpenAI API: {url}/v1)",
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # stop cleanly on kill
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("ldm-serve: stopping", flush=True)
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
