"""The deployment subcommands, in-process: certs, status, errors naming what is wrong."""
import json

import pytest

from atoll.cli import main
from atoll.deploy.server import Server

from .conftest import small_config


@pytest.mark.parametrize("cmd", [["certs"], ["certs", "init"], ["certs", "client"], ["server"],
                                 ["client"], ["status"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0 and "usage: atoll" in capsys.readouterr().out


def test_certs_and_status(tmp_path, capsys):
    d = str(tmp_path / "certs")
    assert main(["certs", "init", "--dir", d, "--host", "localhost"]) == 0
    assert main(["certs", "client", "alice", "--dir", d]) == 0
    assert main(["certs", "client", "ops", "--dir", d, "--token", "--observer"]) == 0
    out = capsys.readouterr().out
    assert "enrolled alice (client id 0)" in out and "enrolled ops (observer)" in out
    assert main(["certs", "init", "--dir", d]) == 2  # an existing authority is not overwritten
    assert "already holds an authority" in capsys.readouterr().err

    server = Server(small_config(tmp_path), run_dir=tmp_path / "run", certs_dir=d, host="localhost",
                    port=0, auth="token", plots=False)
    server.grpc.start()
    try:
        token = str(tmp_path / "certs" / "clients" / "ops.token")
        assert main(["status", f"localhost:{server.port}", "--token", token]) == 0
        assert "starting: round 0/3, 0 of 1 clients connected" in capsys.readouterr().out
        assert main(["status", f"localhost:{server.port}", "--token", token, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["rounds"] == 3
        assert main(["status", f"localhost:{server.port}", "--token", "atl_wrong",
                     "--ca", str(tmp_path / "certs" / "ca.pem")]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["status", f"localhost:{server.port}"]) == 2
        assert "give --cert (mutual TLS) or --token" in capsys.readouterr().err
    finally:
        server.grpc.stop(0)


def test_config_mismatch_on_resume_is_refused(tmp_path):
    d = tmp_path / "certs"
    main(["certs", "init", "--dir", str(d)])
    cfg = small_config(tmp_path)
    Server(cfg, run_dir=tmp_path / "run", certs_dir=d, port=0, plots=False)  # writes config.toml
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")  # as if a round had completed
    other = small_config(tmp_path, rounds=5)
    with pytest.raises(ValueError, match="different config"):
        Server(other, run_dir=tmp_path / "run", certs_dir=d, port=0, plots=False)


def test_server_refuses_another_runs_folder_unless_overwrite(tmp_path):
    d = tmp_path / "certs"
    main(["certs", "init", "--dir", str(d)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')  # another run, no checkpoint
    cfg = small_config(tmp_path)
    with pytest.raises(ValueError, match="not empty"):
        Server(cfg, run_dir=run, certs_dir=d, port=0, plots=False)
    assert (run / "metrics.jsonl").read_text() == '{"round": 1}\n'
    first = Server(cfg, run_dir=run, certs_dir=d, port=0, plots=False, overwrite=True)
    assert (run / "metrics.jsonl").read_text() == ""
    first.grpc.stop(0)
    again = Server(cfg, run_dir=run, certs_dir=d, port=0, plots=False)  # a restart of this run
    again.grpc.stop(0)


def test_server_without_enrolment_is_an_error(tmp_path, capsys):
    (tmp_path / "exp.toml").write_text("rounds = 1\n")
    assert main(["server", str(tmp_path / "exp.toml"), "--certs", str(tmp_path / "nowhere")]) == 2
    assert "run `atoll certs init` first" in capsys.readouterr().err
