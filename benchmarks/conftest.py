def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="cpu or cuda")
