"""Tools of the bundled demo agents. They work offline and answer deterministically."""

from __future__ import annotations

import ast
import datetime
import hashlib
import operator
from collections.abc import Callable
from typing import Any

from .agents import tool


@tool(
    parameters={
        "type": "object",
        "properties": {
            "ticker": {
                "type": "string",
                "description": "The stock's ticker symbol, e.g. NVDA.",
                "pattern": "^[A-Z]{1,5}$",
            }
        },
        "required": ["ticker"],
    }
)
def get_stock_price(ticker: str) -> str:
    """Return the current price of a stock in US dollars (demo data, not a market feed)."""
    symbol = ticker.strip().upper()
    if not symbol.isalpha() or not 1 <= len(symbol) <= 5:
        raise ValueError(f"{ticker!r} is not a ticker symbol")
    # A stable made-up price per symbol, so demos and tests see the same answer every time.
    cents = int.from_bytes(hashlib.sha256(symbol.encode()).digest()[:4], "big") % 100_000
    return f"{cents / 100 + 10:.2f}"


@tool
def get_current_time() -> str:
    """Return the current date and time in UTC, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_OPERATORS: dict[type[ast.AST], Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / % ** ( ) are allowed")


@tool(
    parameters={
        "type": "object",
        "properties": {
            "expression": {"type": "string", "description": "Arithmetic such as (2 + 3) * 4."}
        },
        "required": ["expression"],
    }
)
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    return f"{_evaluate(ast.parse(expression, mode='eval')):g}"
