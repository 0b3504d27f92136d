"""`fvl app`: open the Streamlit explorer on a feature store (loopback only unless --host says otherwise).

The server is a child process in its own process group, so a terminal's Ctrl-C reaches only `fvl app`, which
stops the child with SIGTERM on SIGINT, SIGTERM or SIGHUP and waits for it; a child that does not stop
within STOP_GRACE_S is killed. On Linux the child also gets SIGTERM if `fvl app` itself dies (even by
SIGKILL), so no server is ever left listening without its parent.
"""
from __future__ import annotations

STOP_GRACE_S = 10.0


def register(sub) -> None:
    p = sub.add_parser("app", help="open the Streamlit explorer on a feature store")
    p.add_argument("--store", default=None, help="feature store directory (e.g. runs/demo/store)")
    p.add_argument("--root", default=None, help="data root: the app opens only paths under it "
                                                 "(default: env FVL_DATA_ROOT, else the current directory)")
    p.add_argument("--data", default=None, help="the data set of the store's images (default: RUN/data beside the store)")
    p.add_argument("--image-folder", default=None, metavar="DIR",
                   help="for a LLaVA or COCO --data file: the folder its image paths are relative to")
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
    for flag in ("store", "data", "image_folder", "model"):  # relative paths are taken from the root, as in the app
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd


def run(args) -> int:
    from workbench.pipelines.app_inputs import PathRefused, make_config
    from workbench.commands._common import UserError

    argv = []
    for flag in ("store", "root", "data", "image_folder", "model"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
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
    _check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach this port can browse the data root")
    print(f"Florence-VL workbench on http://{args.host}:{args.port}/  (Ctrl-C stops it)", flush=True)
    return serve(cmd)


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken or an address that cannot be bound, before the server starts: the
    server would otherwise print its own traceback and exit."""
    import socket

    from workbench.commands._common import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror}); "
                        "use 127.0.0.1 (the default) or 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            probe.bind(addr)
            probe.listen()
        except OSError as exc:
            raise UserError(f"--port {port} on {host}: cannot listen there ({exc.strerror}); another server "
                            "may be using it - pick another with --port N") from None


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def serve(cmd: list[str]) -> int:
    """Run the server until it exits or a stop signal arrives; never return while it still runs.
    0 when a signal stopped it (a requested stop is not an error), else the server's exit status."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(cmd, process_group=0, preexec_fn=_die_with_parent)
    stopping: list[float] = []

    def forward(signum, _frame):
        stopping.append(time.monotonic())
        if proc.poll() is None:  # SIGTERM whatever arrived: streamlit's SIGINT path prints a traceback
            proc.send_signal(signal.SIGTERM)

    stops = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
                    proc.kill()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception in this process: take the server down with it
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if stopping:
        print("fvl app: stopped", file=sys.stderr)
        return 0
    return rc
