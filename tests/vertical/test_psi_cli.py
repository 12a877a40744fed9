"""`atoll psi serve` and `atoll psi connect` between two processes over TLS with a token."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import atoll
from atoll.cli import main
from atoll.deploy import certs

SRC = str(Path(atoll.__file__).resolve().parents[1])


def test_serve_and_connect(tmp_path, capsys):
    certs.init(tmp_path / "certs")
    token = certs.issue(tmp_path / "certs", "bank", token=True)["token"]
    bank = [f"cust{k}" for k in range(0, 300)]
    telco = [f"cust{k}" for k in range(200, 450)]
    (tmp_path / "bank.txt").write_text("\n".join(bank) + "\n\n")
    (tmp_path / "telco.txt").write_text("\n".join(telco))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "atoll.cli", "psi", "serve", "telco.txt",
                                 "--certs", "certs", "--learn", "size", "--timeout", "20"],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    try:
        end = time.monotonic() + 30
        while not (m := re.search(r"listening on port (\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        rc = main(["psi", "connect", f"localhost:{m.group(1)}", str(tmp_path / "bank.txt"),
                   "--ca", str(tmp_path / "certs" / "ca.pem"), "--token-file", token,
                   "--out", str(tmp_path / "common.txt"), "--timeout", "20"])
        assert rc == 0
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    mine = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mine["learned"] == "intersection" and mine["size"] == 100 and mine["peer_count"] == 250
    assert (tmp_path / "common.txt").read_text().split() == [f"cust{k}" for k in range(200, 300)]
    theirs = json.loads(log.read_text().strip().splitlines()[-1])
    assert theirs["learned"] == "size" and theirs["size"] == 100 and theirs["peer_count"] == 300
