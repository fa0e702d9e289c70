"""FTP upload client for the benchmarks (Python ftplib, the baseline a user would script).

    python bench/ftpput.py HOST PORT REMOTE_DIR FILE... [--connections K] [--tls CA] [--json]

The files are dealt round-robin onto K control connections (K threads), each sending its share
with ``STOR`` in binary mode (passive data connections, 1 MiB writes). Anonymous login, as the
benchmark's vsftpd is configured. ``--tls CA`` speaks explicit FTPS (AUTH TLS, then PROT P:
control and every data connection encrypted, the server's certificate verified against CA).
Prints a JSON summary on stdout with --json.
"""

from __future__ import annotations

import argparse
import ftplib
import json
import ssl
import sys
import threading
import time
from pathlib import Path


def upload(host: str, port: int, remote_dir: str, files: list[Path], connections: int,
           timeout: float = 60.0, tls_ca: Path | None = None) -> dict[str, object]:
    shares = [files[i::connections] for i in range(connections)]
    errors: list[str] = []
    sent = [0] * connections
    firsts: list[float] = []  # when each connection began its first STOR
    lasts: list[float] = []  # when each connection had its last STOR's reply

    def worker(idx: int) -> None:
        try:
            if tls_ca is None:
                ftp = ftplib.FTP()
                ftp.connect(host, port, timeout=timeout)
                ftp.login()
            else:
                tls = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=str(tls_ca)))
                tls.connect(host, port, timeout=timeout)
                tls.login()  # AUTH TLS first
                tls.prot_p()  # and every data connection encrypted
                ftp = tls
            with ftp:
                try:
                    ftp.mkd(remote_dir)
                except ftplib.error_perm:
                    pass  # another connection made it first
                ftp.cwd(remote_dir)
                ftp.voidcmd("TYPE I")
                for i, path in enumerate(shares[idx]):
                    if i == 0:
                        firsts.append(time.perf_counter())
                    with path.open("rb") as f:
                        ftp.storbinary(f"STOR {path.name}", f, blocksize=1 << 20)
                    sent[idx] += path.stat().st_size
                lasts.append(time.perf_counter())
        except (OSError, ftplib.Error) as exc:
            errors.append(f"connection {idx}: {exc}")

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    # The same split as medstream's report: connecting and login, storing, QUIT.
    phases = {} if not firsts or not lasts else {
        "first_file_s": round(min(firsts) - started, 4),
        "last_ack_s": round(max(lasts) - started, 4),
        "closing_s": round(seconds - (max(lasts) - started), 4),
    }
    return {"files": len(files), "bytes": sum(sent), "seconds": seconds,
            "connections": connections, "errors": errors, "phases": phases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("remote_dir")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--tls", type=Path, metavar="CA",
                   help="explicit FTPS, verifying the server against this CA certificate")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = upload(a.host, a.port, a.remote_dir, a.files, max(1, a.connections), tls_ca=a.tls)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['files']} files, {res['bytes']} bytes in {res['seconds']:.2f} s")
    for e in res["errors"]:  # type: ignore[attr-defined]
        print(f"ftpput: {e}", file=sys.stderr)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
