"""The `latentedit` command line: serve, models install/list, generate, wait."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import grpc

from latentedit.config import SERVICE_NAMES, load_config
from latentedit.errors import LatentEditError


def _config(args: argparse.Namespace):
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from latentedit.launch import serve_all, serve_one

    names = args.services or list(SERVICE_NAMES)
    unknown = [n for n in names if n not in SERVICE_NAMES]
    if unknown:
        raise SystemExit(f"error: unknown service(s) {unknown}; known: {', '.join(SERVICE_NAMES)}")
    config = _config(args)
    if len(names) == 1:
        serve_one(names[0], config)
        return 0
    print(f"starting {', '.join(names)} (one process each); repository {config.repository}", flush=True)
    return serve_all(args.config, names)


def cmd_models_install(args: argparse.Namespace) -> int:
    from latentedit.install import install_defaults
    from latentedit.repository import ModelRepository

    install_defaults(ModelRepository(_config(args).repository))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from latentedit.repository import ModelRepository

    repo = ModelRepository(_config(args).repository)
    entries = repo.entries()
    if not entries:
        print(f"no models in {repo.root}; run: latentedit models install")
    for entry in entries:
        print(f"{entry.name:24s} {entry.kind:12s} v{entry.version}  versions {repo.versions(entry.name)}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from latentedit.client import connect, wait_serving

    config = _config(args)
    for name in args.services or SERVICE_NAMES:
        address = config.address(name)
        print(f"waiting for {name} at {address} ...", flush=True)
        wait_serving(connect(address), timeout_s=args.timeout, what=f"{name} service at {address}")
    print("all SERVING")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from latentedit import wire

    if args.count < 1:
        raise SystemExit("error: --count must be at least 1")
    if args.in_process:
        from generator_svc.pool import GeneratorPool
        from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER, sample_latents
        from latentedit.repository import ModelRepository

        config = _config(args)
        pool = GeneratorPool(ModelRepository(config.repository), config.generator)
        loaded = pool.get(args.model)
        latents = sample_latents(loaded.spec.latent_spaces[0], args.count, args.seed)
        backend = loaded.backends[loaded.default_backend]
        floats = backend.run(latents, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
        images = wire.float_to_uint8_images(floats)
        where = f"in-process ({backend.name})"
        pool.close()
    else:
        from latentedit.client import GeneratorClient, connect, wait_serving

        address = args.target or _config(args).address("generator")
        channel = connect(address)
        wait_serving(channel, timeout_s=args.wait, what=f"generator at {address}")
        client = GeneratorClient(channel, args.model)
        latents = client.sample(args.count, args.seed)
        images = client.synthesize(latents)
        where = f"generator service at {address}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = args.columns or int(np.ceil(np.sqrt(args.count)))
    grid = Image.fromarray(wire.image_grid(images, columns))
    if args.scale > 1:  # 64 px faces are tiny on screen; nearest keeps the real pixels
        grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    grid.save(out)
    print(f"wrote {out} ({args.count} faces, seed {args.seed}, {where})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentedit", description="Latent-space image editing services.")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve one service in this process, or several as child processes")
    serve.add_argument("services", nargs="*", help=f"any of {', '.join(SERVICE_NAMES)} (default: all)")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="manage the model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("install", help="install the embedded default models").set_defaults(func=cmd_models_install)
    models_sub.add_parser("list", help="list the repository").set_defaults(func=cmd_models_list)

    wait = sub.add_parser("wait", help="wait until services report SERVING")
    wait.add_argument("services", nargs="*")
    wait.add_argument("--timeout", type=float, default=180)
    wait.set_defaults(func=cmd_wait)

    gen = sub.add_parser("generate", help="write a PNG grid of generated images")
    gen.add_argument("--out", default="out/faces.png")
    gen.add_argument("--count", type=int, default=16)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--columns", type=int, default=0)
    gen.add_argument("--scale", type=int, default=2, help="enlarge the grid this many times for viewing")
    gen.add_argument("--model", default="", help="generator name (default: the service's default)")
    gen.add_argument("--target", default="", help="generator address (default: from the config)")
    gen.add_argument("--in-process", action="store_true", help="run the generator here instead of calling the service")
    gen.add_argument("--wait", type=float, default=60, help="seconds to wait for the service to be SERVING")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LatentEditError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
