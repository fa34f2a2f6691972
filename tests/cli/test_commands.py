import json

from workbench.cli.commands import main


def test_generate_writes_gif_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "clip.gif"
    assert main(["generate", "--prompt", "a red circle moving left", "--seed", "0", "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 100
    before = out.read_bytes()
    assert main(["generate", "--prompt", "a red circle moving left", "--steps", "2", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before


def test_generate_mp4(tmp_path):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--prompt", "a blue cross moving up", "--steps", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[4:8] == b"ftyp"


def test_bad_prompt_and_extension(tmp_path, capsys):
    assert main(["generate", "--prompt", "a purple cat", "--out", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err
    assert "purple" in err and "Vocabulary" in err
    assert main(["generate", "--prompt", "a red circle moving left", "--steps", "2", "--out", str(tmp_path / "x.avi")]) == 2
    assert ".mp4, .webm or .gif" in capsys.readouterr().err


def test_eval_fp_json_on_a_prompt_file(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("# two prompts\na red circle moving left\n\na fast green square moving up\n")
    assert main(["eval-fp", "--json", "--prompts", str(f), "--seed", "3", "--steps", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("oracle_accuracy", "temporal_consistency", "seconds_per_video"):
        assert isinstance(out[k], float)
    assert out["num_videos"] == 2 and out["seed"] == 3


def test_eval_fp_bad_prompt_file_names_the_line(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a red circle moving left\na red dog moving left\n")
    assert main(["eval-fp", "--json", "--prompts", str(f)]) == 2
    assert "p.txt:2" in capsys.readouterr().err
