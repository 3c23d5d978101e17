"""Build hook only: pyproject.toml holds the package metadata.

`build_protos` compiles protos/**/*.proto with grpc_tools into the package tree (e.g.
protos/glm_ray/v1/experts.proto -> glm_ray/v1/experts_pb2.py, experts_pb2_grpc.py) before
build_py runs, so both `pip install .` (copied into the wheel) and `pip install -e .` (found in
the source tree) ship importable `glm_ray.v1.*_pb2` modules. protos/ is the import root, so the
generated code imports `from glm_ray.v1 import experts_pb2`, not a top-level module.
"""

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"


def compile_protos(out_dir: Path = ROOT) -> list[Path]:
    """Run protoc on every .proto under protos/; returns the .proto files compiled."""
    from importlib.resources import files

    from grpc_tools import protoc

    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    well_known = files("grpc_tools") / "_proto"  # google/protobuf/*.proto, should a file import them
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *map(str, sources)]
    if protoc.main(args) != 0:
        # SystemExit, not an Exception: setuptools' editable install swallows Exceptions from build steps
        raise SystemExit(f"build_protos: protoc failed on {', '.join(str(s) for s in sources)} (see above)")
    return sources


class build_protos(Command):
    description = "compile protos/**/*.proto into the glm_ray package"
    user_options: list = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        for src in compile_protos():
            print(f"build_protos: compiled {src.relative_to(ROOT)}")

    # the outputs live in the source tree; build_py copies them like any other module
    def get_outputs(self):
        return []

    def get_output_mapping(self):
        return {}


class build_with_protos(build):
    sub_commands = [("build_protos", None), *build.sub_commands]


setup(cmdclass={"build": build_with_protos, "build_protos": build_protos})
