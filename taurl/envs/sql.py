"""Questions about a small company, answered by querying a shipped SQLite database.

The database (``taurl/envs/data/company.sql``: departments, employees, products,
orders) is built into a private in-memory SQLite connection for each env instance,
then locked down: ``PRAGMA query_only`` plus an authorizer that allows reading only
(no writes, ATTACH or PRAGMA). The ``sql`` tool runs one statement with a time limit
(SQLite's progress handler interrupts it) and returns at most ``max_rows`` rows.

**Answer format**: the content of ``<answer>...</answer>`` if present, else the whole
final message. Numeric answers match if the last number written equals the true
value (within 0.005, for prices); names match if the true name appears as a phrase
and no other name of the same kind does (so listing every candidate fails).

**Splits.** ``train`` asks single-row look-ups (an employee's salary or department, a
product's price or stock); ``heldout`` asks families never seen in training that
need aggregates or joins (head count of a department, total quantity ordered of a
product, the top earner of a city).
"""

from __future__ import annotations

import re
import sqlite3
import time
from importlib import resources

import gymnasium
import numpy as np

from taurl.envs.base import Task, ToolEnv, last_number
from taurl.envs.tools import Tool
from taurl.errors import ConfigError
from taurl.types import JSONValue, Message

_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}

# family -> (question template, reference query with one "?" parameter)
_TRAIN_FAMILIES: dict[str, tuple[str, str]] = {
    "salary": ("What is the annual salary of {x}?", "SELECT salary FROM employees WHERE name = ?"),
    "department": ("Which department does {x} work in?", "SELECT department FROM employees WHERE name = ?"),
    "price": ("What is the price of the product '{x}'?", "SELECT price FROM products WHERE name = ?"),
    "stock": ("How many units of '{x}' are in stock?", "SELECT stock FROM products WHERE name = ?"),
}
_HELDOUT_FAMILIES: dict[str, tuple[str, str]] = {
    "headcount": ("How many employees work in the {x} department?",
                  "SELECT COUNT(*) FROM employees WHERE department = ?"),
    "ordered": ("What is the total quantity of '{x}' ordered over all orders?",
                ("SELECT COALESCE(SUM(o.quantity), 0) FROM orders o JOIN products p ON p.id = o.product_id "
                 "WHERE p.name = ?")),
    "top_earner": ("Who is the best-paid employee based in {x}?",
                   "SELECT name FROM employees WHERE city = ? ORDER BY salary DESC LIMIT 1"),
}
# family -> query listing the values the "{x}" slot can take
_SUBJECTS = {
    "salary": "SELECT name FROM employees ORDER BY id",
    "department": "SELECT name FROM employees ORDER BY id",
    "price": "SELECT name FROM products ORDER BY id",
    "stock": "SELECT name FROM products ORDER BY id",
    "headcount": "SELECT name FROM departments ORDER BY name",
    "ordered": "SELECT name FROM products ORDER BY id",
    # cities whose top salary is unique, so the question has one answer
    "top_earner": "SELECT city FROM employees e GROUP BY city HAVING "
                  "(SELECT COUNT(*) FROM employees WHERE city = e.city AND salary = MAX(e.salary)) = 1 ORDER BY city",
}
# families with a name as the answer -> query listing every name of that kind (the distractors)
_NAME_KINDS = {
    "department": "SELECT name FROM departments",
    "top_earner": "SELECT name FROM employees",
}


def load_database() -> sqlite3.Connection:
    """A fresh read-only in-memory connection holding the shipped company database."""
    script = resources.files("taurl.envs").joinpath("data/company.sql").read_text(encoding="utf-8")
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(script)
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY)
    return conn


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


class SQLEnv(ToolEnv):
    """Answer questions about a company by querying its SQLite database with a ``sql`` tool.

    Args:
        split: ``"train"`` (single-row look-ups) or ``"heldout"`` (aggregates and joins).
        max_rows: Most rows a query returns to the model.
        query_timeout_s: Time limit per query, enforced inside SQLite.
        max_turns: Assistant turns before truncation.
        tool_timeout_s: None by default: ``query_timeout_s`` already bounds every call.
        **tool_env_kwargs: Options of :class:`~taurl.envs.base.ToolEnv`.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        max_rows: int = 20,
        query_timeout_s: float = 1.0,
        max_turns: int = 5,
        tool_timeout_s: float | None = None,
        **tool_env_kwargs: object,
    ) -> None:
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ConfigError(f"SQLEnv: max_rows must be an int >= 1, got {max_rows!r}")
        if not isinstance(query_timeout_s, (int, float)) or not query_timeout_s > 0:
            raise ConfigError(f"SQLEnv: query_timeout_s must be a number > 0, got {query_timeout_s!r}")
        self.max_rows = max_rows
        self.query_timeout_s = float(query_timeout_s)
        self.conn = load_database()
        tool = Tool.from_function(self.sql, description=self._tool_description(),
                                  examples={"query": "SELECT name, salary FROM employees LIMIT 3"})
        super().__init__([tool], split, max_turns=max_turns, tool_timeout_s=tool_timeout_s,
                         **tool_env_kwargs)  # type: ignore[arg-type]
        self.families = _TRAIN_FAMILIES if split == "train" else _HELDOUT_FAMILIES
        self.subjects = {f: [r[0] for r in self.conn.execute(_SUBJECTS[f])] for f in self.families}
        self.names = {f: [r[0] for r in self.conn.execute(q)] for f, q in _NAME_KINDS.items()}

    def _tool_description(self) -> str:
        tables = self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
        parts = []
        for (table,) in tables:
            columns = ", ".join(d[0] for d in self.conn.execute(f"SELECT * FROM {table} LIMIT 0").description)
            parts.append(f"{table}({columns})")
        return ("Run one read-only SQLite query on the company database and return the rows. "
                "Tables: " + "; ".join(parts) + ".")

    def sql(self, query: str) -> str:
        """Run one read-only SQLite query and return the rows.

        Args:
            query: A single SELECT statement.
        """
        deadline = time.perf_counter() + self.query_timeout_s
        # Called every 1000 SQLite VM steps; a non-zero return interrupts the query.
        self.conn.set_progress_handler(lambda: int(time.perf_counter() > deadline), 1000)
        try:
            cursor = self.conn.execute(query)
            rows = cursor.fetchmany(self.max_rows + 1)
        except sqlite3.Error as e:
            if "interrupted" in str(e):
                raise TimeoutError(f"the query ran longer than {self.query_timeout_s:g} s; simplify it") from None
            hint = " (only read-only SELECT queries are allowed)" if "not authorized" in str(e) else ""
            raise ValueError(f"SQLite error: {e}{hint}") from None
        finally:
            self.conn.set_progress_handler(None, 0)
        header = " | ".join(d[0] for d in cursor.description or [])
        shown = rows[: self.max_rows]
        lines = [header] + [" | ".join("NULL" if v is None else str(v) for v in row) for row in shown]
        if len(rows) > self.max_rows:
            lines.append(f"(only the first {self.max_rows} rows are shown; narrow the query)")
        else:
            lines.append(f"({len(shown)} row{'s' if len(shown) != 1 else ''})")
        return "\n".join(lines)

    def make_task(self, rng: np.random.Generator) -> Task:
        family = sorted(self.families)[int(rng.integers(len(self.families)))]
        question, query = self.families[family]
        subjects = self.subjects[family]
        subject = subjects[int(rng.integers(len(subjects)))]
        answer: JSONValue = self.conn.execute(query, (subject,)).fetchone()[0]
        distractors = [n for n in self.names.get(family, []) if n != answer]
        return Task(
            id=f"sql/{self.split}/{family}/{subject}",
            prompt=(question.format(x=subject) + " Query the company database with the sql tool, then "
                    "give the final answer inside <answer></answer> tags."),
            answer=answer,
            privileged_context=query.replace("?", "'" + subject.replace("'", "''") + "'"),
            metadata={"family": family, "distractors": distractors},
        )

    def score(self, task: Task, answer: str) -> bool:
        expected = task.answer
        if isinstance(expected, (int, float)):
            value = last_number(answer)
            return value is not None and abs(value - expected) <= 0.005
        text = f" {_normalise(answer)} "
        others = task.metadata.get("distractors", [])
        return f" {_normalise(str(expected))} " in text and not any(
            f" {_normalise(str(d))} " in text for d in others  # type: ignore[union-attr]
        )

    def close(self) -> None:
        self.conn.close()
        super().close()


def oracle_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted solver: run the reference query (the privileged context), then answer with its first cell."""
    last = messages[-1]
    if last["role"] == "user" and "<tool_response>" in last["content"]:
        rows = last["content"].split("<tool_response>\n", 1)[1].split("\n")
        return f"<answer>{rows[1]}</answer>"
    query = env.unwrapped.task.privileged_context.replace('"', '\\"')
    return f'<tool_call>{{"name": "sql", "arguments": {{"query": "{query}"}}}}</tool_call>'


def failing_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted wrong answer: the first row of the wrong table, answered without looking further."""
    last = messages[-1]
    if last["role"] == "user" and "<tool_response>" in last["content"]:
        return "<answer>I could not find it</answer>"
    return '<tool_call>{"name": "sql", "arguments": {"query": "SELECT name FROM departments LIMIT 1"}}</tool_call>'
