"""``python -m topoderiv``: prints what was built."""
from ._lib import build_info


def main() -> None:
    info = build_info()
    width = max(len(k) for k in info)
    print("topoderiv build")
    for key, val in info.items():
        print(f"  {key:<{width}} : {val}")


if __name__ == "__main__":
    main()
