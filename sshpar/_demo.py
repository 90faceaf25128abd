"""`sshpar demo`: a local cluster and a guided tour of the seed document's examples.

Layer: CLI helpers. Imports the public API and rich; prints (it is a command's body).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import textwrap
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax

import sshpar as p
from sshpar.config import local_cluster


class Tour:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.ns: dict[str, Any] = {"__name__": "__main__", "p": p}
        self.step = 0

    def show(self, title: str, code: str, explain: str = "") -> Any:
        """Print ``code``, run it in the tour's namespace (like an IPython cell), show the
        value of its last line."""
        self.step += 1
        code = textwrap.dedent(code).strip()
        self.console.rule(f"[bold]{self.step}. {title}")
        if explain:
            self.console.print(explain, style="dim")
        self.console.print(Syntax(code, "python", theme="ansi_dark", background_color="default"))
        *body, last = code.splitlines()
        is_expr = bool(last) and not last.startswith((" ", "@", "with ", "def ", "import "))
        try:
            if is_expr:
                compile(last, "<tour>", "eval")
        except SyntaxError:
            is_expr = False
        if is_expr:
            exec("\n".join(body), self.ns)
            value = eval(last, self.ns)
            if value is not None:
                self.console.print(f"[green]Out:[/] {value!r}")
            return value
        exec(code, self.ns)
        return None

    def expect_error(self, title: str, code: str, explain: str = "") -> None:
        try:
            self.show(title, code, explain)
        except p.RemoteError as err:
            self.console.print(err)
        else:  # pragma: no cover - the tour's own check
            raise AssertionError(f"step {title!r} should have raised")


def run_demo(engines: int = 2, *, console: Console | None = None,
             workdir: str | None = None,
             on_client: Callable[[p.Client], None] | None = None) -> None:
    """Start ``engines`` local engines and walk through the seed examples."""
    console = console or Console()
    workdir = workdir or tempfile.mkdtemp(prefix="sshpar-demo-")
    os.makedirs(workdir, exist_ok=True)
    script = os.path.join(workdir, "myscript.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write("import math\nimport sys\n\n\ndef mysquare(x):\n    return x*x\n")
    console.print(Panel.fit(
        "sshpar demo: a cluster of local engines (transport: local — no SSH needed),\n"
        "walking through 'Basics of remote execution' with `import sshpar as p`.\n"
        "Against real hosts, the only change is `p.Client(hosts=\"hosts.yaml\")`.",
        title="sshpar"))
    tour = Tour(console)
    tour.ns["_spec"] = local_cluster(engines, name="demo", workdir=workdir, idle_timeout=300,
                                   keep_launcher=0)  # a one-off: leave nothing behind
    tour.ns["_script"] = script
    tour.show("Creating a Client", "rc = p.Client(hosts=_spec)\nrc.ids",
              "One Client per cluster; engines are separate processes with their own "
              "namespaces.")
    rc = tour.ns["rc"]
    if on_client is not None:
        on_client(rc)
    try:
        _tour(tour)
    finally:
        rc.shutdown()
        console.rule("[bold]done")
        console.print("Every engine was shut down. Next: write a hosts.yaml "
                      "(see hosts.example.yaml) and call p.Client(hosts='hosts.yaml').")


def _tour(tour: Tour) -> None:
    tour.show("A view on one engine", "e0 = rc[0]\ne0.block = True\ne0")
    if importlib.util.find_spec("numpy") is None:
        tour.console.print("[yellow]numpy is not installed here: skipping the numpy steps "
                           "(pip install numpy, or run scripts/demo)[/]")
    else:
        _numpy_steps(tour)
    _rest(tour)


def _numpy_steps(tour: Tour) -> None:
    tour.show("Remote execution with apply()", """
        def get_norms(A, levels=[2]):
            norms = []
            for level in levels:
                norms.append(numpy.linalg.norm(A, level))
            return norms

        import numpy
        A = numpy.random.random(1024)
        e0.apply(get_norms, A, levels=[1, 2, 3, numpy.inf])
    """, "Replace `get_norms(` by `e0.apply(get_norms,` and the call runs on the engine.")
    tour.show("execute() and sync_imports()", """
        e0.execute('import numpy')
        with e0.sync_imports():
            import numpy
        e0.apply(numpy.linalg.norm, A, 2)
    """)


def _rest(tour: Tour) -> None:
    tour.show("run() uploads a local script", """
        e0['a'] = 5
        e0.run(_script)
        e0.execute('b=mysquare(a)')
        e0['a'], e0['b']
    """, "The file is read here and sent; the engine never needs to see this machine's disk.")
    tour.show("Remote function decorators", """
        @e0.remote(block=True)
        def getpid():
            import os
            return os.getpid()

        import os
        getpid(), os.getpid()
    """)
    tour.show("The engine namespace is the functions' globals", """
        def inc_a(increment):
            global a
            a = a+increment

        def mul_by_a(b):
            return a*b

        e0['a'] = 10
        e0.apply(inc_a, 5)
        e0.apply(mul_by_a, 2)
    """)
    tour.show("Reference: a name on the engine", """
        ra = p.Reference('a')
        e0['a'] = 10

        def double(x):
            return x*2

        e0.apply(double, ra)
    """)
    tour.show("push() and pull()", """
        e0.push(dict(a=1.03234, b=3453))
        e0.pull(('a', 'b'))
    """)
    tour.show("The dictionary interface", "e0['a'] = ['foo', 'bar']\ne0['a']")
    tour.show("Non-blocking execution and AsyncResult", """
        def wait(t):
            import time
            tic = time.time()
            time.sleep(t)
            return time.time()-tic

        ar = e0.apply_async(wait, 0.5)
        ar.ready(), ar.get()
    """)
    tour.show("Metadata", "sorted(ar.metadata)")
    tour.show("All engines at once: map, scatter, gather", """
        dv = rc[:]
        dv.block = True
        dv.scatter('x', list(range(8)))
        dv.map(lambda v: v * v, range(8)), dv.gather('x')
    """)
    tour.show("@require", """
        @p.require('re')
        def findall(pat, x):
            return re.findall(pat, x)

        e0.apply(findall, 'an', 'banana')
    """)
    tour.expect_error("Remote exceptions", "e0.execute('1/0', block=True)",
                      "The engine's traceback comes back as a RemoteError, rendered by rich.")
