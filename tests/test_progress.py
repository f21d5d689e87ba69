import io

from rich.console import Console

from fdcache.progress import Progress


def _console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=120)


def test_plain_lines_when_not_a_terminal_periodic_and_a_last_one_never_past_the_total():
    c = _console(False)
    p = Progress("train", 4, console=c, every_s=3600)
    for _ in range(6):
        p.update(advance=1, loss=0.25)
    p.close()
    lines = c.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 4/4 step (100%)") and "loss 0.25" in lines[0]
    c = _console(False)
    p = Progress("eval images", 3, unit="batch", console=c, every_s=0)
    for _ in range(3):
        p.update(advance=1)
    assert [line.split(" (")[0] for line in c.file.getvalue().splitlines()] == \
        ["eval images: 1/3 batch", "eval images: 2/3 batch", "eval images: 3/3 batch"]


def test_a_terminal_gets_a_rich_bar_clamped_to_its_total_and_starting_where_a_resume_does():
    c = _console(True)
    p = Progress("finetune", 10, completed=4, console=c)
    assert p.n == 4
    for _ in range(8):
        p.update(advance=1)
    assert p.n == 10 and p._bar.tasks[0].completed == 10
    p.close()
    assert "10/10" in c.file.getvalue()


def test_disabled_progress_prints_nothing():
    c = _console(False)
    p = Progress("x", 2, console=c, enabled=False, every_s=0)
    p.update(advance=2)
    p.close()
    assert c.file.getvalue() == ""
