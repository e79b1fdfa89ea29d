import json
import subprocess
import sys

from sorabench.cli import main
from sorabench.data.video_io import write_video
from tests.test_data import moving_square


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train-vae", "train", "sample", "evaluate", "sweep", "report", "data"):
        assert command in out


def test_cfg_job_prints_resolved_config(capsys):
    assert main(["data", "preview", "data.num_frames=16", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    import yaml

    cfg = yaml.safe_load(out)  # the whole config, resolved: no interpolation left
    assert cfg["data"]["num_frames"] == 16 and "${" not in out
    assert cfg["mlflow"]["tracking_uri"].startswith("sqlite:///") and cfg["mlflow"]["tracking_uri"].endswith("mlflow.db")


def test_unknown_key_is_one_line_exit_2(capsys):
    assert main(["data", "preview", "data.bogus_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bogus_key" in err and len(err.splitlines()) == 1


def test_bad_value_is_one_line_exit_2(capsys):
    assert main(["data", "preview", "data.num_frames=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.num_frames" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_exit_code_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "sorabench.cli", "data", "preview", "nonsense_key=3"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nonsense_key" in proc.stderr


def test_data_preview_writes_clips(tmp_path, capsys):
    out = tmp_path / "prev"
    assert main(["data", "preview", f"out={out}", "n=3", "data.split_sizes.train=8", f"outputs={tmp_path}"]) == 0
    for i in range(3):
        assert (out / f"clip_{i:02d}.mp4").stat().st_size > 0 and (out / f"clip_{i:02d}.gif").stat().st_size > 0
    assert len((out / "captions.txt").read_text().splitlines()) == 3 and (out / "preview.png").is_file()


def test_data_check_exit_codes(tmp_path, capsys):
    write_video(tmp_path / "a.mp4", moving_square())
    write_video(tmp_path / "b.mp4", moving_square())
    rows = [{"video": "a.mp4", "caption": "one"}, {"video": "b.mp4", "caption": "two"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["data", "check", "data=folder", f"data.root={tmp_path}", "data.val_fraction=0", "data.test_fraction=0"]
    assert main(args) == 0
    assert "2 readable clips, 0 problems" in capsys.readouterr().out
    (tmp_path / "c.mp4").write_bytes(b"not a video")
    (tmp_path / "d.mp4").write_bytes((tmp_path / "a.mp4").read_bytes())  # uncaptioned
    write_video(tmp_path / "e.mp4", moving_square(t=3))  # too short for 8 frames
    extra = [{"video": "c.mp4", "caption": "3"}, {"video": "e.mp4", "caption": "4"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows + extra))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "c.mp4" in out and "unreadable" in out and "d.mp4" in out and "no caption" in out and "e.mp4" in out
