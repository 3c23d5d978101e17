"""The `glm-ray` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glm_ray.argtypes import device_arg, non_negative_int, number_in, positive_int


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
    from glm_ray.device import resolve_device
    from glm_ray.model.reference import greedy_generate
    from glm_ray.tokenizer import Tokenizer

    model_dir = _model_dir(args)
    try:
        model, experts, config = load_model(model_dir, dtype=args.dtype, device=resolve_device(args.device))
    except (ConfigError, CheckpointError, ValueError) as e:
        raise SystemExit(f"glm-ray: error: {e}") from None
    tokenizer = Tokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise SystemExit("glm-ray: error: the prompt is empty")
    out = greedy_generate(model, experts, [prompt_ids], args.max_tokens, config.eos_token_ids)[0]
    print(args.prompt + tokenizer.decode(out))
    return 0


def set_path(data: dict, assignment: str) -> None:
    """`--set a.b=VALUE`: VALUE read as YAML (numbers, lists, null), at the dotted path."""
    import yaml

    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"glm-ray: error: --set {assignment!r}: expected FIELD=VALUE, e.g. "
                         "--set attention_resources.num_cpus=2")
    *parents, leaf = key.strip().split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SystemExit(f"glm-ray: error: --set {key}: {'.'.join(parents[:i + 1])} is not a mapping")
        node = child
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SystemExit(f"glm-ray: error: --set {key}: cannot read the value {text!r} ({e})") from None


def replicas_arg(text: str):
    from glm_ray.serving.autoscaling import replicas_arg as parse

    return parse(text)


def serve_config_of(args):
    """The ServeConfig `glm-ray serve` and `glm-ray config` take: --config FILE (a ServeConfig YAML
    or a Serve config file), then --set assignments, then the named flags."""
    from pydantic import ValidationError

    from glm_ray.serving.config import ServeConfig

    try:
        cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    except (OSError, ValueError) as e:
        raise SystemExit(f"glm-ray: error: --config {args.config}: {e}") from None
    data = cfg.to_dict()
    for assignment in args.set or []:
        set_path(data, assignment)
    for name in ("expert", "attention"):  # N: a fixed count; MIN:MAX: autoscaled with default targets
        value = getattr(args, f"{name}_replicas")
        if isinstance(value, tuple):
            base = data.get(f"{name}_autoscaling") or {}
            data[f"{name}_autoscaling"] = {**base, "min_replicas": value[0], "max_replicas": value[1]}
        elif value is not None:
            data[f"{name}_replicas"] = value
            data[f"{name}_autoscaling"] = None
    overrides = dict(model=args.model, expert_groups=args.expert_groups, dtype=args.dtype, host=args.host,
                     device=args.device, expert_backend=args.expert_backend, decode_attention=args.decode_attention,
                     ingress_replicas=args.ingress_replicas,
                     redundant_experts=args.redundant_experts, rebalance_threshold=args.rebalance_threshold,
                     http_port=args.http_port,
                     grpc_port=args.grpc_port, expert_host=args.expert_host,
                     cluster_secret_file=args.cluster_secret_file, api_keys=args.api_key or None,
                     grpc_enabled=False if args.no_grpc else None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = ServeConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SystemExit(f"glm-ray: error: {where}: {first['msg']} (given {first.get('input')!r})") from None
    except ValueError as e:
        raise SystemExit(f"glm-ray: error: {e}") from None
    if cfg.model is not None and not (Path(cfg.model) / "config.json").is_file():
        raise SystemExit(f"glm-ray: error: --model {cfg.model}: no config.json there")
    return cfg


def cmd_serve(args) -> int:
    from glm_ray.serving.local import serve_forever

    return serve_forever(serve_config_of(args), http_proxy=args.http_proxy)


def cmd_config(args) -> int:
    """Write a Serve config file (`serve deploy FILE`) from the same ServeConfig `glm-ray serve` uses."""
    import os

    from glm_ray.serving.credentials import new_cluster_secret
    from glm_ray.serving.serve_file import render

    cfg = serve_config_of(args)
    if cfg.cluster_secret is None and cfg.cluster_secret_file is None and not args.no_cluster_secret:
        # a fixed secret in the file keeps it across redeploys of the file
        cfg = cfg.model_validate({**cfg.to_dict(), "cluster_secret": new_cluster_secret()})
    header = ("glm-ray Serve config file, written by `glm-ray config`.\n"
              "It holds the cluster secret (and API keys if set): keep it private (mode 0600).")
    text = render(cfg, header)
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return 0
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(args.out, 0o600)
    print(f"wrote {args.out} (mode 0600: it holds the cluster secret); deploy it with `serve deploy {args.out}`",
          file=sys.stderr)
    return 0


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The flags `glm-ray serve` and `glm-ray config` share."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny model, "
                   "random weights)")
    p.add_argument("--expert-groups", type=non_negative_int, default=None,
                   help="G, number of expert groups; 0: colocated, the routed experts inside each attention replica")
    p.add_argument("--attention-replicas", type=replicas_arg, default=None, metavar="N|MIN:MAX",
                   help="attention replicas: a fixed N, or MIN:MAX to autoscale on demand")
    p.add_argument("--expert-replicas", type=replicas_arg, default=None, metavar="N|MIN:MAX",
                   help="replicas per expert group: a fixed N, or MIN:MAX to autoscale each group on its load")
    p.add_argument("--ingress-replicas", type=positive_int, default=None, metavar="N",
                   help="ingress replicas (HTTP app, gRPC service, tokenization), each with its own in-flight limit")
    p.add_argument("--redundant-experts", type=non_negative_int, default=None, metavar="R",
                   help="spare expert slots per group, filled by rebalancing with copies of the hottest experts")
    p.add_argument("--rebalance-threshold", type=number_in(0, 1), default=None, metavar="B",
                   help="rebalance when the balancedness over expert groups (min over layers) falls below B "
                   "(default 0.8 with --redundant-experts, else off; 0: off)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None)
    p.add_argument("--device", type=device_arg, default=None, metavar="auto|cpu|cuda[:N]",
                   help="where replicas compute (default auto: a GPU when the replica reserved one)")
    p.add_argument("--expert-backend", choices=["auto", "cpu-kernel", "torch", "deepspeed"], default=None,
                   help="routed-expert compute (default auto: GPU deepspeed, else torch; CPU cpu-kernel)")
    p.add_argument("--decode-attention", choices=["torch", "cpu-kernel"], default=None,
                   help="decode attention (default torch: exact; cpu-kernel: faster on x86 CPUs in fp32, equal to "
                   "fp32 rounding only)")
    p.add_argument("--host", default=None, help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None, help="Serve's gRPC proxy port; it binds every interface")
    p.add_argument("--no-grpc", action="store_true", help="start no gRPC proxy")
    p.add_argument("--expert-host", default=None, help="bind address of the expert gRPC servers (0.0.0.0 on "
                   "a cluster)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require this client API key (repeat for several; default: $GLM_RAY_API_KEY, "
                   "comma-separated)")
    p.add_argument("--cluster-secret-file", default=None, metavar="FILE",
                   help="read the dispatch plane's cluster secret from FILE (default: $GLM_RAY_CLUSTER_SECRET, "
                   "else a random one)")
    p.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                   help="set any ServeConfig field, dotted for nested ones (e.g. --set "
                   "expert_resources.resources.experts=1); repeatable")
    p.add_argument("--config", default=None, help="a ServeConfig YAML or a Serve config file; flags override it")


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
            session = RemoteChat(args.url, _sampling(args), not args.no_thinking, args.api_key)
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
        print(status_report(ServerClient(args.url, api_key=args.api_key)))
    except ClientError as e:
        raise SystemExit(f"glm-ray: error: --url {args.url}: {e}") from None
    return 0


def cmd_rebalance(args) -> int:
    from glm_ray.client import ClientError, ServerClient, rebalance_report

    try:
        print(rebalance_report(ServerClient(args.url, api_key=args.api_key).rebalance()))
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
    p.add_argument("--shards", type=positive_int, default=1, help="number of safetensors files")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("generate", help="generate a continuation in-process (greedy)")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny model)")
    p.add_argument("--max-tokens", type=positive_int, default=32)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--device", type=device_arg, default="auto", metavar="auto|cpu|cuda[:N]",
                   help="default auto: CUDA where torch sees a GPU")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model on Ray Serve (starts a local Ray cluster without RAY_ADDRESS)")
    add_serve_flags(p)
    p.add_argument("--http-proxy", choices=["haproxy", "serve"], default="haproxy",
                   help="what serves HTTP on the local cluster this starts: haproxy (default), Ray Serve's HAProxy "
                        "ingress, HTTP straight to the ingress replicas; serve, Serve's Python proxy (a Ray "
                        "message per streamed chunk). A cluster named by RAY_ADDRESS keeps its own "
                        "(RAY_SERVE_ENABLE_HA_PROXY=1 in its `ray start` environment)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="write a Serve config file for `serve deploy` (the flags of `serve`)")
    add_serve_flags(p)
    p.add_argument("--out", default=None, metavar="FILE", help="write here (mode 0600) instead of stdout")
    p.add_argument("--no-cluster-secret", action="store_true",
                   help="write no cluster secret (default: a new random one, unless --cluster-secret-file): each "
                   "deploy then uses $GLM_RAY_CLUSTER_SECRET where the app is built, else a random one")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("chat", help="chat interactively, in-process or with a running server (--url)")
    p.add_argument("--url", default=None, metavar="http://HOST:PORT", help="a running glm-ray (or OpenAI) server")
    p.add_argument("--model", default=None, help="in-process: checkpoint directory (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="in-process compute dtype")
    p.add_argument("--system", default=None, help="a system message for the conversation")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="most tokens per reply")
    p.add_argument("--temperature", type=number_in(0, 2), default=None, help="0 is greedy (default: the model's 1)")
    p.add_argument("--top-p", type=number_in(0, 1, low_open=True), default=None)
    p.add_argument("--no-thinking", action="store_true", help="ask GLM to answer without a thinking block")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key (default: $GLM_RAY_API_KEY)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("status", help="deployments, expert groups and their load, from a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $GLM_RAY_API_KEY)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("rebalance", help="rebalance the expert placement of a running server now")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $GLM_RAY_API_KEY)")
    p.set_defaults(func=cmd_rebalance)

    from glm_ray.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from glm_ray.plan import add_plan_parser
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
