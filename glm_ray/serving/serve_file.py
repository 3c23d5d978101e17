"""A Ray Serve config file (`serve deploy FILE`) from a ServeConfig: what `glm-ray config` writes.

The file's application args are the ServeConfig itself, each field preceded by its description,
so the file `glm-ray serve` would run and the file `serve deploy` runs are one and the same.
"""

from __future__ import annotations

import textwrap

import yaml
from pydantic import BaseModel

from glm_ray.serving.config import BUILD_APP, ServeConfig

APP_NAME = "glm-ray"
GRPC_SERVICERS = ["glm_ray.v1.generate_pb2_grpc.add_GenerationServicer_to_server"]


def http_options(cfg: ServeConfig) -> dict:
    return {"host": cfg.host, "port": cfg.http_port}


def grpc_options(cfg: ServeConfig) -> dict:
    """No servicer functions means Serve starts no gRPC server at all."""
    return {"port": cfg.grpc_port, "grpc_servicer_functions": GRPC_SERVICERS if cfg.grpc_enabled else []}


def serve_config_file(cfg: ServeConfig) -> dict:
    """The Serve config file as data (ray.serve.schema.ServeDeploySchema's shape)."""
    return {"proxy_location": "EveryNode", "http_options": http_options(cfg), "grpc_options": grpc_options(cfg),
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": BUILD_APP,
                              "args": cfg.to_dict()}]}


def render(cfg: ServeConfig, header: str = "") -> str:
    """The Serve config file as commented YAML."""
    data = serve_config_file(cfg)
    app = data["applications"][0]
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += ["# Deploy: serve deploy THIS_FILE [--address http://HEAD:8265]; or: glm-ray serve --config THIS_FILE",
              "proxy_location: EveryNode  # an HTTP (and gRPC) proxy on every node",
              "http_options:",
              f"  host: {_scalar(cfg.host)}  # HTTP bind address; 0.0.0.0 on a cluster, with api_keys set",
              f"  port: {cfg.http_port}",
              "grpc_options:  # Serve's gRPC proxy binds every interface ([::]) on this port",
              f"  port: {cfg.grpc_port}",
              "  grpc_servicer_functions:" + ("" if cfg.grpc_enabled else " []  # grpc_enabled is false: no gRPC proxy")]
    lines += [f"  - {name}" for name in data["grpc_options"]["grpc_servicer_functions"]]
    lines += ["applications:",
              f"- name: {app['name']}",
              f"  route_prefix: {app['route_prefix']}",
              f"  import_path: {app['import_path']}",
              "  args:  # a glm_ray.serving.config.ServeConfig; every field described"]
    lines += _commented(ServeConfig, app["args"], indent=4)
    return "\n".join(lines) + "\n"


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...").strip()


def _commented(model: type[BaseModel], values: dict, indent: int) -> list[str]:
    pad = " " * indent
    out = []
    for name, field in model.model_fields.items():
        value = values[name]
        if field.description:
            out += textwrap.wrap(field.description, 110 - indent, initial_indent=f"{pad}# ",
                                 subsequent_indent=f"{pad}# ")
        sub = _submodel(field.annotation)
        if sub is not None and isinstance(value, dict):
            out.append(f"{pad}{name}:")
            out += _commented(sub, value, indent + 2)
        elif isinstance(value, (dict, list)) and value:
            out.append(f"{pad}{name}:")
            block = yaml.safe_dump(value, sort_keys=False, default_flow_style=False, width=1 << 20)
            out += [f"{pad}  {line}" for line in block.splitlines()]
        else:
            out.append(f"{pad}{name}: {_scalar(value)}")
    return out


def _submodel(annotation) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def header_of(text: str) -> str:
    """The free comment lines at the top of a file `render` wrote."""
    head = text.split("# Deploy:", 1)[0]
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in head.splitlines())


def rewrite(path: str) -> None:
    """Re-render a Serve config file from its own args and header: after editing its args, or
    after ServeConfig gained a field or changed a description."""
    from pathlib import Path

    text = Path(path).read_text()
    Path(path).write_text(render(ServeConfig.from_yaml(text), header_of(text)))
