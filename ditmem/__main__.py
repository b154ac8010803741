from ditmem.cli import app

app(prog_name="ditmem")
