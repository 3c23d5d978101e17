"""The `glm-ray` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def number_in(low: float, high: float, *, low_open: bool = False):
    """An argparse type: a float in [low, high] (or (low, high]), the message naming the value."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"{value} must be in {'(' if low_open else '['}{low}, {high}]")
        return value

    return parse


def _model_dir(args) -> Path:
    from glm_ray.model.default import default_model_dir

    if args.model is None:
        return default_model_dir()
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"glm-ray: error: --model {args.model}: no config.json there (build one with "
                         "`glm-ray make-model --out DIR`)")
    return path


def cmd_make_model(args) -> int:
    from glm_ray.model.synthetic import make_model

    out = make_model(args.out, args.preset, seed=args.seed, dtype=args.dtype, shards=args.shards)
    print(f"wrote {args.preset} model (seed {args.seed}) to {out}")
    return 0


def cmd_generate(args) -> int:
    from glm_ray.config import ConfigError
    from glm_ray.model.loader import CheckpointError, load_model
    from glm_ray.model.reference import greedy_generate
    from glm_ray.tokenizer import Tokenizer

    model_dir = _model_dir(args)
    try:
        model, experts, config = load_model(model_dir, dtype=args.dtype)
    except (ConfigError, CheckpointError) as e:
        raise SystemExit(f"glm-ray: error: {e}") from None
    tokenizer = Tokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise SystemExit("glm-ray: error: the prompt is empty")
    out = greedy_generate(model, experts, [prompt_ids], args.max_tokens, config.eos_token_ids)[0]
    print(args.prompt + tokenizer.decode(out))
    return 0


def cmd_serve(args) -> int:
    from glm_ray.serving.local import serve_forever
    from glm_ray.serving.config import ServeConfig

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    overrides = {k: v for k, v in dict(model=args.model, expert_groups=args.expert_groups,
                                       attention_replicas=args.attention_replicas,
                                       expert_replicas=args.expert_replicas, dtype=args.dtype, host=args.host,
                                       http_port=args.http_port, grpc_port=args.grpc_port).items() if v is not None}
    try:
        cfg = ServeConfig.model_validate({**cfg.model_dump(), **overrides})
    except ValueError as e:
        raise SystemExit(f"glm-ray: error: {e}") from None
    if cfg.model is not None and not (Path(cfg.model) / "config.json").is_file():
        raise SystemExit(f"glm-ray: error: --model {cfg.model}: no config.json there")
    return serve_forever(cfg)


def _sampling(args) -> dict:
    out = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    if args.top_p is not None:
        out["top_p"] = args.top_p
    return {k: v for k, v in out.items() if v is not None}


def cmd_chat(args) -> int:
    from glm_ray.chat_repl import LocalChat, RemoteChat, run_chat
    from glm_ray.client import ClientError

    if args.url and args.model:
        raise SystemExit("glm-ray: error: give --url (a running server) or --model (in-process), not both")
    try:
        if args.url:
            session = RemoteChat(args.url, _sampling(args), not args.no_thinking)
        else:
            from glm_ray.config import ConfigError
            from glm_ray.model.loader import CheckpointError

            try:
                session = LocalChat(_model_dir(args), _sampling(args), not args.no_thinking, args.dtype)
            except (ConfigError, CheckpointError) as e:
                raise SystemExit(f"glm-ray: error: {e}") from None
    except ClientError as e:
        raise SystemExit(f"glm-ray: error: --url {args.url}: {e}") from None
    print("glm-ray chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves.")
    return run_chat(session, system=args.system)


def cmd_status(args) -> int:
    from glm_ray.client import ClientError, ServerClient, status_report

    try:
        print(status_report(ServerClient(args.url)))
    except ClientError as e:
        raise SystemExit(f"glm-ray: error: --url {args.url}: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-ray", description="Serve GLM-4.5 / GLM-4.6 MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a deterministic GLM-4 MoE checkpoint directory")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--shards", type=_positive_int, default=1, help="number of safetensors files")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("generate", help="generate a continuation in-process (greedy)")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny model)")
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model on Ray Serve (starts a local Ray cluster without RAY_ADDRESS)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny model)")
    p.add_argument("--expert-groups", type=_positive_int, default=None, help="G, number of expert groups")
    p.add_argument("--attention-replicas", type=_positive_int, default=None, help="N, attention replicas")
    p.add_argument("--expert-replicas", type=_positive_int, default=None, help="replicas per expert group")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None)
    p.add_argument("--host", default=None, help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--config", default=None, help="a ServeConfig YAML file; flags override it")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat interactively, in-process or with a running server (--url)")
    p.add_argument("--url", default=None, metavar="http://HOST:PORT", help="a running glm-ray (or OpenAI) server")
    p.add_argument("--model", default=None, help="in-process: checkpoint directory (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="in-process compute dtype")
    p.add_argument("--system", default=None, help="a system message for the conversation")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="most tokens per reply")
    p.add_argument("--temperature", type=number_in(0, 2), default=None, help="0 is greedy (default: the model's 1)")
    p.add_argument("--top-p", type=number_in(0, 1, low_open=True), default=None)
    p.add_argument("--no-thinking", action="store_true", help="ask GLM to answer without a thinking block")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("status", help="deployments, expert groups and their load, from a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.set_defaults(func=cmd_status)

    from glm_ray.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
