"""The watch over a multi-process run's peers (qdata.peers): when a silent peer counts as lost,
and the flag that sets how long. The end-to-end case (a peer killed mid-run) is in test_faults.py."""
import pytest

from qdata import cli, peers


def test_a_peer_is_lost_only_after_its_counter_stands_still_for_the_timeout():
    seen = {}
    assert peers._lost_peer({1: None, 2: None}, seen, 4.0, now=0.0) is None  # not written yet: the clock starts
    assert peers._lost_peer({1: "1", 2: None}, seen, 4.0, now=3.0) is None
    assert peers._lost_peer({1: "2", 2: None}, seen, 4.0, now=4.0) is None  # 2 silent for 4.0 s: not yet
    lost = peers._lost_peer({1: "3", 2: None}, seen, 4.0, now=4.5)
    assert lost and lost.startswith("process 2 stopped answering for 4 s")
    seen = {}
    for t in range(100):  # a peer that keeps counting is never lost, however long the run
        assert peers._lost_peer({1: str(t)}, seen, 4.0, now=float(t * 3)) is None
    assert peers._lost_peer({1: "99"}, seen, 4.0, now=99 * 3 + 4.01).startswith("process 1 ")


def test_jax_heartbeat_comes_after_the_watch():
    for timeout in (0.5, 4.0, 60.0, peers.MAX_PEER_TIMEOUT):
        assert peers.jax_heartbeat_seconds(timeout) > timeout


@pytest.mark.parametrize("value", ["0", "-1", "3601", "nan"])
def test_peer_timeout_out_of_range_is_refused_before_work(value, capsys, tmp_path):
    code = cli.main(["train", "--num-processes", "2", "--process-id", "0", "--peer-timeout", value,
                     "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("qdata: error: --peer-timeout must be in (0, 3600] seconds"), err
    assert not (tmp_path / "r").exists()


def test_an_error_inside_a_watched_run_is_one_line_with_the_checkpoint(monkeypatch):
    monkeypatch.setattr(peers, "_watched", dict(process_id=1, num_processes=3, describe=lambda: "the note"))
    err = RuntimeError("INTERNAL: Gloo all-reduce failed:\n Connection closed by peer [127.0.0.1]:21901")
    line = peers.collective_failed(err)
    assert "\n" not in line and line.endswith("; the note")
    assert line.startswith("process 1 of 3: a step with the other processes failed, a peer died or left the run "
                           "(RuntimeError: INTERNAL: Gloo all-reduce failed: Connection closed by peer")
