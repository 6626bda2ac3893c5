from llmos.cli.main import app

app()
