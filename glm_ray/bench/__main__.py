import sys

from glm_ray.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
