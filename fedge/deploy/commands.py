"""`fedge certs` and `fedge deploy ...`: a real Flower deployment, TLS and auth on."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from fedge.cli import reports_errors
from fedge.deploy import supernode
from fedge.deploy.certs import create_certificates, load_server_hosts
from fedge.deploy.gateway import DEFAULT_MAX_BODY, Upstream, serve
from fedge.deploy.local import DEFAULT_CONNECTION, DEFAULT_DIR, DeploymentError, LocalDeployment


@reports_errors
def _certs(args: argparse.Namespace) -> int:
    report = create_certificates(args.dir, args.hosts, args.nodes, force=args.force, days=args.days)
    certs = report.certs
    for path in report.created:
        print(f"created {path}")
    for path in report.kept:
        print(f"kept    {path}")
    hosts = ", ".join(load_server_hosts(certs.server_cert))
    print(
        f"\nThe SuperLink certificate is valid for: {hosts}\n"
        f"SuperLink:  --ssl-ca-certfile {certs.ca_cert} --ssl-certfile {certs.server_cert} "
        f"--ssl-keyfile {certs.server_key} --enable-supernode-auth\n"
        f"SuperNode i: --root-certificates ca.crt --auth-supernode-private-key supernode-i.key\n"
        f"Register each key once the SuperLink runs: flwr supernode register "
        f"{certs.directory}/supernode-i.pub <connection>\n"
        f"Keep {certs.ca_key.name} off the SuperNodes; each Pi needs only ca.crt and its own key."
    )
    return 0


def security_banner(deployment: LocalDeployment) -> str:
    """What `fedge deploy local` enforces, and what it does not: printed, never implied."""
    control, fleet = deployment.address, deployment.fleet_address
    lines = [
        f"  Fleet API   {fleet:<21} SuperNodes; a gateway serves only POST /v1/fleet/*",
        f"  Control API {control:<21} flwr CLI; bound to loopback, no login",
    ]
    if deployment.insecure:
        lines += [
            "Enforced: the Control API (register keys, list/start runs) is not served on the "
            "Fleet address.",
            "NOT enforced (--insecure): TLS and SuperNode auth are off; any process that "
            f"reaches {fleet} can join as a SuperNode and read or send its traffic.",
        ]
    else:
        lines += [
            "Enforced: TLS on both addresses; a SuperNode joins only with a key registered "
            f"through {control}; keys are registered and runs listed/started only there.",
            "NOT enforced: the Control API has no login (every user with a shell on this "
            "machine can use it); a stolen node key joins as that node.",
        ]
    return "\n".join(lines)


class _Stop(Exception):
    """Raised from the SIGTERM/SIGHUP handler so `finally` stops the federation."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@reports_errors
def _deploy_local(args: argparse.Namespace) -> int:
    deployment = LocalDeployment(
        args.nodes,
        args.dir,
        insecure=args.insecure,
        port_base=args.port_base,
        edge_nodes=args.edge_nodes,
        node_config_extra=args.node_config_extra,
        connection=args.connection,
        startup_timeout=args.timeout,
        fast=not args.stock_supernodes,
    )
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        deployment.start()
        print(
            f"{args.nodes} SuperNodes online; logs in {deployment.logs_dir}\n"
            f"{security_banner(deployment)}\n"
            "Run the fedge app on it from the project directory:\n",
            flush=True,
        )
        print(deployment.run_command("."), flush=True)
        print("\nPress Ctrl-C to stop everything.", flush=True)
        reported: set[str] = set()
        while True:
            for problem in deployment.problems():
                if problem not in reported:
                    reported.add(problem)
                    print(f"warning: {problem}", file=sys.stderr, flush=True)
                if problem.startswith(("superlink ", "fleet-gateway ")):
                    raise DeploymentError(f"{problem}; stopping the SuperNodes")
            time.sleep(1.0)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping SuperNodes and SuperLink ...", file=sys.stderr, flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave orphans behind.
        stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stopping}
        try:
            deployment.stop()
        finally:
            for sig, handler in {**saved, **previous}.items():
                signal.signal(sig, handler)


@reports_errors
def _supernode(args: argparse.Namespace) -> int:
    """Run `fedge deploy supernode` (fedge/deploy/supernode.py) until stopped."""
    options, flower_args = supernode.parse_args(args.flwr_args[1:])  # after "supernode"
    supernode.run(options, flower_args)
    return 0


@reports_errors
def _fleet_gateway(args: argparse.Namespace) -> int:
    """Serve the Fleet-only gateway (fedge/deploy/gateway.py) until stopped."""
    given = [
        path is not None for path in (args.ssl_certfile, args.ssl_keyfile, args.root_certificates)
    ]
    if any(given) if args.insecure else not all(given):
        raise DeploymentError(
            "give --ssl-certfile, --ssl-keyfile and --root-certificates (TLS), or --insecure"
        )
    serve(
        args.listen,
        Upstream(args.superlink, None if args.insecure else args.root_certificates),
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        max_body=args.max_body,
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `certs` and `deploy local|supernode|fleet-gateway` to the `fedge` command line."""
    certs = subparsers.add_parser(
        "certs",
        help="make a CA, a SuperLink TLS certificate and SuperNode auth keys",
        description="Create (or complete) the TLS and SuperNode-authentication files of a "
        "Flower deployment. Existing files are kept and checked; nothing is overwritten "
        "without --force.",
    )
    certs.add_argument("dir", type=Path, help="output folder, e.g. certs/")
    certs.add_argument(
        "--hosts",
        nargs="+",
        default=[],
        metavar="HOST",
        help="names/IPs SuperNodes use to reach the SuperLink, e.g. 192.168.1.10 "
        "superlink.local (127.0.0.1 and localhost are always included)",
    )
    certs.add_argument(
        "--nodes", type=int, default=0, help="SuperNode key pairs supernode-0..N-1 to create"
    )
    certs.add_argument(
        "--days", type=int, default=365, help="validity of the SuperLink certificate"
    )
    certs.add_argument(
        "--force",
        action="store_true",
        help="reissue the CA, server certificate and keys (every SuperNode then needs the "
        "new ca.crt and re-registered keys)",
    )
    certs.set_defaults(func=_certs)

    deploy = subparsers.add_parser("deploy", help="run real Flower deployments")
    commands = deploy.add_subparsers(dest="deploy_command", required=True)
    local = commands.add_parser(
        "local",
        help="start a SuperLink and N SuperNodes on 127.0.0.1 (TLS and auth on)",
        description="Start flower-superlink and N SuperNodes (fedge deploy supernode) on "
        "127.0.0.1, with TLS and SuperNode authentication unless --insecure, and print the "
        "`flwr run` command that uses them. Ctrl-C stops everything.",
    )
    local.add_argument("--nodes", type=int, default=2, help="SuperNodes to start")
    local.add_argument(
        "--insecure", action="store_true", help="plain HTTP and no SuperNode auth (debug only)"
    )
    local.add_argument(
        "--dir",
        type=Path,
        default=Path(DEFAULT_DIR),
        help="certs, logs and FLWR_HOME go here (default: %(default)s)",
    )
    local.add_argument(
        "--port-base",
        type=int,
        default=8000,
        help="SuperLink port; SuperNode i uses port-base+1+i; 0 picks free ports "
        "(default: %(default)s)",
    )
    local.add_argument(
        "--edge-nodes",
        type=int,
        default=0,
        help="mark the last K SuperNodes edge=true (torch-free edge learner)",
    )
    local.add_argument(
        "--node-config-extra",
        default="",
        metavar="'K=V ...'",
        help="added to every SuperNode's --node-config, e.g. 'site=\"lab\"'",
    )
    local.add_argument(
        "--connection",
        default=DEFAULT_CONNECTION,
        help="name of the connection written to <dir>/flwr-home/config.toml",
    )
    local.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for everything to start"
    )
    local.add_argument(
        "--stock-supernodes",
        action="store_true",
        help="run Flower's plain flower-supernode (3 s idle poll, one flwr-clientapp process "
        "per message) instead of `fedge deploy supernode`",
    )
    local.set_defaults(func=_deploy_local)

    node = commands.add_parser(
        "supernode",
        help="Flower's SuperNode with a responsive poll and a warm ClientApp worker",
        description=supernode.__doc__.splitlines()[0] if supernode.__doc__ else None,
        epilog="Every other option goes to Flower's flower-supernode unchanged, e.g. "
        "fedge deploy supernode --superlink HOST:9092 --root-certificates ca.crt "
        "--auth-supernode-private-key node.key --node-config 'partition-id=0 num-partitions=3'",
    )
    supernode.add_options(node)
    node.set_defaults(func=_supernode, passes_flwr_args=True)

    gateway = commands.add_parser(
        "fleet-gateway",
        help="expose only the Fleet API of a loopback SuperLink to SuperNodes",
        description="Forward Flower's Fleet API (POST /v1/fleet/..., all a SuperNode uses) "
        "to a SuperLink that listens on loopback, and answer 404 to everything else, so "
        "devices cannot reach the Control API (register keys, list or start runs) or the "
        "Runtime API. Node authentication stays with the SuperLink.",
    )
    gateway.add_argument(
        "--listen", required=True, help="host:port the SuperNodes connect to, e.g. 0.0.0.0:9092"
    )
    gateway.add_argument(
        "--superlink",
        required=True,
        help="host:port of the SuperLink (flower-superlink --host/--port), e.g. 127.0.0.1:8000",
    )
    gateway.add_argument("--ssl-certfile", type=Path, help="server certificate, e.g. server.pem")
    gateway.add_argument("--ssl-keyfile", type=Path, help="its private key, e.g. server.key")
    gateway.add_argument(
        "--root-certificates", type=Path, help="CA that signed the SuperLink's certificate"
    )
    gateway.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    gateway.add_argument(
        "--max-body",
        type=int,
        default=DEFAULT_MAX_BODY,
        help="largest request body in bytes (default: %(default)s)",
    )
    gateway.set_defaults(func=_fleet_gateway)
