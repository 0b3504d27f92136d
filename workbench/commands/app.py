"""`fvl app`: open the Streamlit explorer on a feature store (loopback only unless --host says otherwise)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("app", help="open the Streamlit explorer on a feature store")
    p.add_argument("--store", default=None, help="feature store directory (e.g. runs/demo/store)")
    p.add_argument("--root", default=None, help="data root: the app opens only paths under it "
                                                 "(default: env FVL_DATA_ROOT, else the current directory)")
    p.add_argument("--data", default=None, help="the data set of the store's images (default: RUN/data beside the store)")
    p.add_argument("--model", default=None, help="model directory for live mode (default: RUN/model beside the store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--dry-run", action="store_true", help="check the paths and print the streamlit command only")
    p.set_defaults(func=run)


def streamlit_command(args) -> list[str]:
    import sys
    from pathlib import Path

    import workbench

    script = Path(workbench.__file__).resolve().parents[1] / "app.py"
    if not script.is_file():  # installed without the repository: run the packaged entry
        script = Path(workbench.__file__).resolve().parent / "app_views" / "entry.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal",
           "--"]
    if args.root:
        cmd += ["--root", str(Path(args.root).resolve())]
    for flag in ("store", "data", "model"):  # relative paths are taken from the root, as in the app
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    return cmd


def run(args) -> int:
    import subprocess

    from workbench.app_views.context import PathRefused, make_config
    from workbench.cli import UserError

    argv = []
    for flag in ("store", "root", "data", "model"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    try:
        make_config(argv)  # refuse bad paths here, before a server starts
    except PathRefused as exc:
        raise UserError(str(exc)) from exc
    if args.port < 1 or args.port > 65535:
        raise UserError(f"--port {args.port}: give a port between 1 and 65535")
    cmd = streamlit_command(args)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach this port can browse the data root")
    print(f"Florence-VL workbench on http://{args.host}:{args.port}/  (Ctrl-C stops it)")
    return subprocess.call(cmd)
