r"""verify.py - the binary verifier: is a completion's final answer the gold answer?

Every reinforce-or-penalise decision in RLSD comes from here, so model output is hostile input.  It is never run
(no eval/exec/sympify): a small hand-written parser reads the answers and exact Fractions compare them.  Both
sides are capped in length and no pattern can backtrack, so every call ends within milliseconds.

    extract_answer(completion) -> str | None     the last <answer>..</answer>, else the last \boxed{..} / \fbox{..},
    verify(completion, reference) -> 1.0 | 0.0   else the line after the last "answer is", "answer:" or "####"
    reference(text) -> str                       a gold answer as training reads it: a worked solution's final one
    python verify.py "COMPLETION" "REFERENCE"     prints the extracted answer and the verdict (--explain: the reading)
    python verify.py --data FILE --answer-field answer     lists the gold answers that do not parse

Disagreeing boxes (or tags) form one unordered list: "\boxed{3} or \boxed{4}" only matches "3, 4".
Both sides are normalised the same way:
  clean    drop presentation: $, \( \), \left, \!, ~, ^\circ, \text{}; units only from a fixed list of words,
           so prose is no answer ("5 is not the answer" is not 5)
  split    "or", "and", \cup, top-level commas -> unordered list, as is {..}; (a, b] -> tuple or interval, its
           brackets kept; matrices -> tuples of rows; a:b -> ratio; \pm -> two answers; A (B) B. -> choice
  relate   = < > \le \ge \ne and chains, > flipped to <; a solved inequality (x < 3, -2 \le x \le 7,
           x \in [-2, 7]) is an interval; a label left of = (x, f(x), (p, q), |AB|) counts only if both have one
  compare  lists as multisets, tuples in order, numbers exactly when both are rational (1/2004! != 1/2006!),
           within REL_TOL when irrational (sqrt, pi, trig); anything with a decimal in it never matches an
           irrational; expressions with variables exactly at N_POINTS fixed random rational points.
Final-form rules, so that an answer cannot just restate the question:
  * A plain rational gold (integer, decimal, fraction, mixed number, percentage, 1.5e6) needs a plain rational
    answer: "3+4", "2^{10}", "\sqrt{4}", "5!" do not match 7, 1024, 2, 120 (an unreduced 6/8 is fine).
  * Otherwise no arithmetic between plain numbers ("2\cdot3\sqrt2"), unsimplified radical ("\sqrt{8}") or
    function of a constant ("\sin\frac{\pi}{3}") unless the gold has one; (x+2)(x+5) != x^2+7x+10.
Also: 25% is 25 or 0.25; i and e are plain symbols; equations match with sides swapped, never scaled.
"""
from __future__ import annotations

import cmath
import functools
import math
import os
import random
import re
import sys
from fractions import Fraction
from itertools import accumulate

REL_TOL = 1e-9           # relative, irrational values only: float error is ~1e-15, a looser bound lets sloppy ones in
N_POINTS = 3             # random points at which expressions with variables are compared
MAX_COMPLETION = 50_000  # only the tail of a longer completion is read
MAX_ANSWER = 1_000       # a longer "final answer" (or gold answer) is garbage, not an answer
MAX_FINALS = 32          # more boxes or answer tags than this is spam: wrong
MAX_DEPTH, MAX_NODES = 40, 300   # parser nesting and expression size
MAX_BITS = 24_000        # size of any exact number (2006! has 19,119 bits)
WORK_BUDGET = 4_000      # big-number work per verify() call, in (kilobit)^2 units


class _Reject(Exception):
    """Not a comparable answer: unparseable, too big, or against the rules."""


# ---------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*(?=\{|([^\s${][^\s$]{0,99}))")   # \boxed{..} or \boxed 5
_BRACE = re.compile(r"\\[\s\S]|[{}]")          # an escaped character is skipped whole
_TAG = re.compile(r"<answer>((?:(?!<answer>)[\s\S])*?)</answer>")
_LAST_CUE = re.compile(r"(?s:.*)(?:answer\s*(?:is|:)|####)", re.IGNORECASE)


def _close_brace(text: str, i: int) -> int:
    """Index of the '}' matching text[i] == '{', or -1.  Looks at most MAX_ANSWER ahead."""
    depth = 0
    for m in _BRACE.finditer(text, i, i + MAX_ANSWER + 2):
        depth += (m[0] == "{") - (m[0] == "}")
        if depth == 0:
            return m.start()
    return -1


def _finals(completion: str) -> list[str]:
    """Every final answer at the winning precedence level (see the module docstring)."""
    text = completion[-MAX_COMPLETION:]
    if text.count("<answer>") > MAX_FINALS or text.count("\\boxed") + text.count("\\fbox") > MAX_FINALS:
        return []
    found, end = _TAG.findall(text), 0                 # each </answer> with the last opener before it
    for m in [] if found else _BOX.finditer(text):
        if m.start() < end:                         # a box inside the previous box
            continue
        if m[1] or (end := _close_brace(text, m.end())) > 0:   # an unclosed \boxed{ is not an answer
            found.append(m[1] or text[m.end() + 1:end])
    if found or not (m := _LAST_CUE.match(text)):
        return [f.strip() for f in found]
    line = text[m.end():].lstrip(" :\t")
    if line.startswith(("\\[", "\\(")) and (k := line.find("\\" + "])"[line[1] == "("], 0, MAX_ANSWER)) > 0:
        return [line[2:k].strip()]                                  # display math may span lines
    line = re.split(r"\.\s", line.split("\n", 1)[0], maxsplit=1)[0].strip().rstrip(".")   # its first sentence
    return [line] if line else []


def extract_answer(completion: str) -> str | None:
    """The final answer: last <answer> tag, else last \\boxed{}, else an "answer is" line."""
    return (_finals(completion) or [None])[-1]


# ---------------------------------------------------------------- cleaning

_UNICODE = str.maketrans({"−": "-", "–": "-", "×": r"\times ", "·": r"\cdot ", "÷": "/",
                          "π": r"\pi ", "√": r"\sqrt", "∞": r"\infty ", "±": r"\pm ", "∓": r"\mp ",
                          "∪": r"\cup ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ", "°": ""})
_WRAPPER = re.compile(r"\\(?:boxed|fbox|text\w*|math(?:rm|bf|it|sf|tt)|mbox|operatorname)\s*\{")
# Whitespace is collapsed first, so that no pattern below has a run of spaces to scan more than once.
_CLEANUP = [(re.compile(p), r) for p, r in [
    (r"\s+", " "),
    (r"(?<=\d) ?(?:, ?\\!|\{, ?\}|\\,) ?(?=\d{3})", ""),          # thousands: 10,\!080 10{,}080
    (r"\\\\|\\[,;:! ()[\]]|\\(?:q?quad|displaystyle|left|right|[bB]igg?[lr]?)(?![A-Za-z])|~|\\?\$",
     lambda m: m[0] if m[0] == "\\\\" else " "),           # spacing, \( \) \[ \] (keep \\, the row break)
    (r"\\([{}])", r"\1"),                                      # \{1, 2\} and {1, 2} are both sets
    (r"\^ ?\{? ?\\circ ?\}?|\\(?:circ|degree)(?![A-Za-z])", ""),   # degrees
    (r"\\%| ?\b(?:percent(?:age)?|pct)\b", "%"),
    (r"\\[dtc]frac(?![A-Za-z])", r"\\frac"),
    (r"(?<![\\A-Za-z])(sqrt|pi)(?![A-Za-z])", r"\\\1"),       # plain-text sqrt(2), pi
    (r"(?<![\\A-Za-z])inf(?:inity|ty)?(?![A-Za-z])", r"\\infty"),
    (r"(?<=[\w)}]) ?\*\* ?(?=[\w({\\.-])", "^"),               # python-style 2**3
    (r" ?: ?", ":"), (r" +", " ")]]                             # ratios 3 : 1 == 3:1


def _clean(s: str) -> str:
    """Strip presentation but keep meaning; 1,234 is one number."""
    s, pos = s.translate(_UNICODE), 0
    while m := _WRAPPER.search(s, pos):           # \text{..}, \boxed{..}: keep the content
        if (k := _close_brace(s, m.end() - 1)) < 0:
            raise _Reject("unbalanced braces")
        s, pos = f"{s[:m.start()]} {s[m.end():k]} {s[k + 1:]}", m.start()
    for pattern, repl in _CLEANUP:
        s = pattern.sub(repl, s)
    s = s.strip().strip("*").strip().rstrip(".,;").strip()
    return re.sub(r"\A[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?[^\d,]*\Z", lambda m: m[0].replace(",", ""), s)


# ---------------------------------------------------------------- structure

_CHOICE = re.compile(r"\(([A-J])\)|([A-J])[.):]?")
_WORDS = re.compile(r"[A-Za-z]+(?:[ '-][A-Za-z]+)*")
_MATRIX = re.compile(r"[\[(]? ?\\begin\{([pbBvV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\} ?[\])]?", re.S)
_MIXED = re.compile(r"(-?)(\d+)(?: ?\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))| (\d+)/(\d+))")
_RELATION = re.compile(r"[<>!]=|\\(?:[lg]eq?|[lg]t|neq?|in)(?![A-Za-z])|[<>=]")
_OPS = {"\\lt": "<", "\\le": "<=", "\\leq": "<=", "\\gt": ">", "\\ge": ">=", "\\geq": ">=", "\\ne": "!=", "\\neq": "!="}
_UNITS = set("""cm mm km inch inches ft foot feet yd yard yards mile miles mph kg gram grams lb lbs pound pounds
    oz ounce ounces sec second seconds min minute minutes hr hrs hour hours day days week weeks month months year
    years dollar dollars cent cents degree degrees unit units sq square cubic meter meters metre metres liter liters
    litre litres ml gallon gallons per""".split()) | {""}   # one letter (m, g, s) reads as a variable instead
_INFINITY = ("expr", ("infty",), False), ("expr", ("neg", ("infty",)), False)


def _depths(s: str) -> list[int]:
    """Bracket depth after each character; interval brackets like [0, 1) count too."""
    return list(accumulate((ch in "([{") - (ch in ")]}") for ch in s))


def _split_top(s: str, seps: str = ",;") -> list[str]:
    """Split at separators that are outside all brackets."""
    cuts = [i for i, (ch, d) in enumerate(zip(s, _depths(s))) if d == 0 and ch in seps]
    return [s[a + 1:b] for a, b in zip([-1] + cuts, cuts + [len(s)])]


def _parse(answer: str):
    """Answer text -> normal form, a nested tuple such as ("expr", tree, is_percent)."""
    s = re.sub(r" (?:or|and) |\\cup(?![A-Za-z])", ",", _clean(answer))
    if len(s) > MAX_ANSWER or max(_depths(s), default=0) > MAX_DEPTH:   # nested tuples cost depth x length
        raise _Reject("too long or too deep")
    if not (nodes := [n for part in _split_top(s) if part.strip() for n in _parse_item(part)]):
        raise _Reject("empty")
    return nodes[0] if len(nodes) == 1 else ("list", tuple(nodes))


def _one(s: str):
    if len(nodes := _parse_item(s)) != 1:
        raise _Reject("one value expected")
    return nodes[0]


def _parse_item(s: str) -> tuple:
    """One comma-free item -> a tuple of normal forms (two for a \\pm answer)."""
    s = s.strip()
    if m := _CHOICE.fullmatch(s):
        return (("choice", m[1] or m[2]),)
    if _WORDS.fullmatch(s) and re.search("[A-Za-z]{2}", s):
        return (("word", s.lower()),)
    words = s.split(" ")
    while len(words) > 1 and all(w in _UNITS for w in re.sub(r"\^\{?[23]\}?$", "", words[-1]).lower().split("/")):
        words.pop()                                                 # units: 5 cm, 42 dollars per hour, 3 km/h
    s = " ".join(words).strip()
    pct, s = s.endswith("%"), s.rstrip("%").strip()
    depth = _depths(s)
    if m := _MATRIX.fullmatch(s):                                   # a tuple of rows
        rows = [("tuple", "[", "]", tuple(map(_one, r.split("&")))) for r in m[2].split("\\\\") if r.strip()]
        return (("tuple", "[", "]", tuple(rows)),)
    wrapped = s[:1] in ("(", "[", "{") and s[-1] in ")]}" and 0 not in depth[:-1]   # (1, 2], not (a+5)(b+2)
    if wrapped and len(parts := _split_top(s[1:-1])) > 1:           # a tuple, an interval or a {set}
        items = tuple(n for p in parts for n in (_parse_item(p) if s[0] == "{" else (_one(p),)))
        return (("list", items),) if s[0] == "{" else (("tuple", s[0], s[-1], items),)
    if cuts := [m for m in _RELATION.finditer(s) if depth[m.start()] == 0]:
        sides = [s[a:b] for a, b in zip([0] + [m.end() for m in cuts], [m.start() for m in cuts] + [len(s)])]
        ops = tuple(_OPS.get(m[0], m[0]) for m in cuts)
        if ">" in "".join(ops):                                     # 5 \ge x is x \le 5
            if "<" in "".join(ops):
                raise _Reject("mixed directions")
            sides, ops = sides[::-1], tuple(op.replace(">", "<") for op in ops[::-1])
        nodes = tuple(map(_one, sides))
        bare = [n[0] == "expr" and n[1][0] == "var" for n in nodes]
        if ops == ("\\in",) and bare[0]:                          # x \in [-2, 7] is [-2, 7]
            return nodes[1:]
        if ops in (("<",), ("<=",)) and any(bare):                 # x < 3 is -oo < x < 3; 3 < x is 3 < x < oo
            nodes, ops = ((_INFINITY[1],) + nodes, ("<",) + ops) if bare[0] else (nodes + _INFINITY[:1], ops + ("<",))
        if set(ops) <= {"<", "<="} and len(nodes) == 3:            # a solved inequality is an interval
            return (("tuple", "(["[ops[0] == "<="], ")]"[ops[1] == "<="], (nodes[0], nodes[2])),)
        return (("rel", ops, nodes),)
    if len(parts := _split_top(s, ":")) > 1:                        # a ratio 3:1
        return (("tuple", "ratio(", ")", tuple(map(_one, parts))),)
    if m := _MIXED.fullmatch(s):                                     # 2\frac{1}{2} and 1 4/5 are mixed numbers
        s = m[1] + str(int(m[2]) + Fraction(int(m[3] or m[4] or m[7]), int(m[5] or m[6] or m[8])))
    signs = ("+", "-") if "\\pm" in s else ("-", "+") if "\\mp" in s else ("",)
    return tuple(("expr", _Parser(re.sub(r"\\(?:pm|mp)(?![A-Za-z])", lambda _: sign, s, 1)).tree, pct)
                 for sign in signs)                                  # 1 \pm \sqrt2: two answers


# ---------------------------------------------------------------- expressions

_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta lambda mu nu xi rho sigma tau phi "
             "varphi chi psi omega".split())
_FUNCS = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "cot": lambda z: 1 / cmath.tan(z), "ln": cmath.log,
          "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z), "log": cmath.log, "exp": cmath.exp}
_ATOM_COMMANDS = _GREEK | set(_FUNCS) | {"frac", "sqrt", "pi", "infty"}
_TOKEN = re.compile(r" *(\\(?:[A-Za-z]+|.)|.|)", re.S)     # spaces, then a \command or one character
_NUM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d{1,3})(?!\d))?(?:_(?:\{(\w{1,10})\}|(\w)))?")   # 52_8: base 8
_NAME = re.compile(r".(?:_(?:\{\w{1,10}\}|\w))?", re.S)    # a letter, maybe with a subscript: x, a_1, x_{10}


class _Parser:
    """Recursive descent over LaTeX-ish math, all of it or _Reject.  Trees are tuples: ("add", a, b), ("num", q)."""

    def __init__(self, s: str):
        self.s, self.i, self.depth, self.count = s, 0, 0, 0
        self.tree = self.expr()
        if self.peek():
            raise _Reject(f"unexpected {s[self.i:self.i + 10]!r}")

    def peek(self) -> str:
        """The next token, not consumed: a \\command or one character ("" at the end)."""
        self.i = (m := _TOKEN.match(self.s, self.i)).start(1)
        return m[1]

    def eat(self, token: str, required: bool = False) -> bool:
        if found := self.peek() == token:
            self.i += len(token)
        elif required:
            raise _Reject(f"expected {token}")
        return found

    def node(self, *parts):
        self.count += 1
        if self.count > MAX_NODES:
            raise _Reject("expression too large")
        return parts

    def expr(self):
        tree = self.term()
        while (tok := self.peek()) in ("+", "-"):
            self.i += 1
            tree = self.node("add" if tok == "+" else "sub", tree, self.term())
        return tree

    def term(self):
        tree = self.unary()
        while True:
            if (tok := self.peek()) in ("*", "/", "\\cdot", "\\times", "\\div"):
                self.i += len(tok)
                tree = self.node("div" if tok in ("/", "\\div") else "mul", tree, self.unary())
            elif tok[:1].isalnum() or tok in ("(", "[", "{") or tok[1:] in _ATOM_COMMANDS:
                tree = self.node("mul", tree, self.power())  # an implicit product: 2x, 3\sqrt2
            else:
                return tree

    def unary(self):
        if self.eat("-"):                                   # counted before recursing: ------1 stops at MAX_NODES
            return self.node("neg") + (self.unary(),)
        self.eat("+")
        return self.power()

    def power(self):
        tree = self.atom()
        while self.eat("!"):
            tree = self.node("fact", tree)
        return self.node("pow", tree, self.unary()) if self.eat("^") else tree   # right-associative: 9^9^9 = 9^(9^9)

    def arg(self):
        """A macro argument: {..}, (..), a command or one character, as in \\frac43 or \\sqrt2."""
        if self.peek().isdecimal():  # not isdigit: int() refuses a superscript ²
            self.i += 1
            return self.node("num", Fraction(int(self.s[self.i - 1])))
        return self.atom()

    def atom(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:                          # before recursing: ||||.. nests without brackets
            raise _Reject("expression too deep")
        tok = self.peek()
        if tok.isdigit() or tok == ".":
            if not (m := _NUM.match(self.s, self.i)):
                raise _Reject("bad number")
            self.i = m.end()
            if m[3] or m[4]:                                # 52_8: a base-8 numeral
                tree = self.node("base", m[1], m[3] or m[4])
            else:
                value = Fraction(m[1]) * Fraction(10) ** int(m[2] or 0)
                tree = self.node("num", value, "dec") if "." in m[1] else self.node("num", value)
        elif tok.isalpha():                                 # one letter, one symbol: xy = x*y
            self.i = (m := _NAME.match(self.s, self.i)).end()
            tree = self.node("var", m[0].replace("{", "").replace("}", ""))   # x_{10} is x_10
        elif tok in ("(", "[", "{", "|"):
            self.i += 1
            tree = self.expr()
            self.eat({"(": ")", "[": "]", "{": "}", "|": "|"}[tok], required=True)
            tree = self.node("abs", tree) if tok == "|" else tree
        elif (name := tok[1:]) in _ATOM_COMMANDS:
            self.i += len(tok)
            if name == "frac":
                tree = self.node("div", self.arg(), self.arg(), "frac")
            elif name == "sqrt":                            # \sqrt[3]{x} has an index
                index = self.expr() if self.eat("[") else None
                if index is not None:
                    self.eat("]", required=True)
                tree = self.node("sqrt", self.arg(), index)
            elif name in _FUNCS:                            # \sin 3x is sin(3x); \sin^2 x is (sin x)^2
                exponent = self.arg() if self.eat("^") else None
                tree = self.arg() if self.peek() in ("{", "(") else self.power()
                while self.peek()[:1].isalnum():
                    tree = self.node("mul", tree, self.power())
                tree = self.node("fn", name, tree)
                tree = self.node("pow", tree, exponent) if exponent else tree
            else:
                tree = self.node(name) if name in ("pi", "infty") else self.node("var", name)
        else:
            raise _Reject(f"unexpected {tok!r}")
        self.depth -= 1
        return tree


# ---------------------------------------------------------------- form rules

def _kids(tree) -> list:
    return [k for k in tree[1:] if isinstance(k, tuple)]


def _vars(tree) -> set:
    return {tree[1]} if tree[0] == "var" else set().union(*map(_vars, _kids(tree)))


def _has(tree, ops) -> bool:
    """An operator (or a tag: "dec" marks a decimal number) anywhere in the tree."""
    return tree[0] in ops or tree[-1] in ops or any(_has(k, ops) for k in _kids(tree))


def _label(n) -> bool:
    """Names only, no numbers or sums, as left of "=": x, f(x), |AB|, (p, q), V_1:V_2, \\frac{NO}{BO}."""
    kids = n[3] if n[0] == "tuple" else n[1:2] if n[0] == "expr" else _kids(n)
    return n[0] in ("tuple", "expr", "word", "choice", "var", "mul", "div", "abs") and all(map(_label, kids))


def _literal(tree) -> Fraction | None:
    """The value of a plain rational literal (12, -0.5, 3/4, \\frac{6}{8}, 1.5\\times10^{6}), else None."""
    op = tree[0]
    if op == "num":
        return tree[1]
    if op == "neg":
        return None if (v := _literal(tree[1])) is None else -v
    if op == "div":
        a, b = _literal(tree[1]), _literal(tree[2])
        return a / b if a is not None and b and a.denominator == b.denominator == 1 else None
    if op == "pow" and tree[1] == ("num", 10) and (k := _literal(tree[2])) is not None and k.denominator == 1:
        return Fraction(10) ** int(k) if abs(k) <= 400 else None
    if op == "mul" and tree[1][0] == "num" and tree[2][0] == "pow":    # 1.5\times10^{6}
        return None if (p := _literal(tree[2])) is None else tree[1][1] * p
    return None


def _unsimplified(tree) -> bool:
    """Arithmetic that a final answer should have finished: 3+4, 2\\cdot3, 2^5, 5!, \\sqrt8, \\sin 1."""
    op, kids = tree[0], _kids(tree)
    if op in ("add", "sub", "mul", "pow", "fact") and _literal(tree) is None and None not in map(_literal, kids):
        return True
    if op == "sqrt" and tree[2] is None and (v := _literal(tree[1])) is not None and v.denominator == 1 \
            and 0 < v <= 10**6 and any(v % (p * p) == 0 for p in range(2, math.isqrt(int(v)) + 1)):
        return True                                         # a square factor left under the root
    return op == "fn" and not _vars(tree) or any(map(_unsimplified, kids))


def _factored(tree) -> bool:
    """Product form like 2(k+1) or (a+5)(b+2), as opposed to a sum of terms."""
    if tree[0] in ("neg", "div"):                           # -(a+5)(b+2), \frac{(a+5)(b+2)}{3}
        return _factored(tree[1])
    if tree[0] == "mul":
        return any(k[0] in ("add", "sub") or _factored(k) for k in tree[1:3])
    return tree[0] == "pow" and tree[1][0] in ("add", "sub")


# ---------------------------------------------------------------- evaluation

def _bits(q: Fraction) -> int:
    return max(q.numerator.bit_length(), q.denominator.bit_length())


def _complex(v) -> complex:
    """v (a Fraction, or an inexact result) as a finite complex number."""
    if isinstance(v, Fraction) and v and not float(v):      # float() raises OverflowError if huge
        raise _Reject("underflow")                          # 1/2004! must not become 0.0
    if not cmath.isfinite(z := complex(v)):
        raise _Reject("overflow")
    return z


def _iroot(n: int, k: int) -> int | None:
    """The exact integer k-th root of n >= 0, or None."""
    if k > 2 and n.bit_length() > 1000:
        return None
    r = math.isqrt(n) if k == 2 else round(math.exp(math.log(n) / k)) if n else 0
    return next((x for x in (r - 1, r, r + 1) if x >= 0 and x ** k == n), None)


def _close(a, b) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = _complex(a), _complex(b)
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


class _Checker:
    """Compares normal forms; holds the work budget of one verify() call."""
    work = 0

    def charge(self, *values: Fraction) -> tuple:
        """The values, once their big-number work is within the budget."""
        bits = max(map(_bits, values))
        self.work += 1 + (bits // 1000) ** 2
        if self.work > WORK_BUDGET or bits > MAX_BITS:
            raise _Reject("too much work")
        return values

    def ev(self, t, env):
        """The value of tree t: a Fraction when exact, else a complex."""
        op = t[0]
        if op in ("num", "var", "pi"):
            return t[1] if op == "num" else env[t[1]] if op == "var" else complex(math.pi)
        v = [self.ev(k, env) for k in _kids(t)]
        exact = all(isinstance(x, Fraction) for x in v)
        if op in ("neg", "abs"):
            return -v[0] if op == "neg" else abs(v[0])
        if op == "fn":
            return _complex(_FUNCS[t[1]](_complex(v[0])))
        if op == "fact":
            if not (exact and v[0].denominator == 1 and 0 <= v[0] <= 3000):
                raise _Reject("bad factorial")
            return self.charge(Fraction(math.factorial(int(v[0]))))[0]
        if op == "sqrt":
            return self.root(v[0], v[1] if len(v) > 1 else Fraction(2))
        if op == "pow":
            return self.power(*v)
        a, b = self.charge(*v) if exact else map(_complex, v)   # infinity and base-n numerals never get here
        r = a + b if op == "add" else a - b if op == "sub" else a * b if op == "mul" else a / b
        return r if exact else _complex(r)

    def power(self, a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction) and b.denominator <= 100:
            self.charge(a, b)
            if a not in (0, 1, -1) and abs(b.numerator) * _bits(a) > MAX_BITS:
                raise _Reject("power too large")            # 9^9^9^9, 10^{10^{10}}
            p = a ** b.numerator
            return p if b.denominator == 1 else self.root(p, Fraction(b.denominator))
        return _complex(_complex(a) ** _complex(b))           # OverflowError if huge: no match

    def root(self, v, k):
        if not (isinstance(k, Fraction) and k.denominator == 1 and 2 <= k <= 100):
            raise _Reject("bad root")
        k = int(k)
        if isinstance(v, Fraction) and (v >= 0 or k % 2):  # real: the odd root of a negative is minus that of -v
            self.charge(v)                                  # exact if a perfect power
            n, d = _iroot(abs(v.numerator), k), _iroot(v.denominator, k)
            r = Fraction(n, d) if n is not None and d is not None else _complex(_complex(abs(v)) ** (1 / k))
            return r if v >= 0 else -r
        return _complex(_complex(v) ** (1 / k))

    def defined(self, t, env):
        """The value at one point, or None where undefined (division by zero, log 0)."""
        try:
            return self.ev(t, env)
        except (ZeroDivisionError, ValueError):
            return None

    def expr_same(self, c, r) -> bool:
        (_, ct, cpct), (_, rt, rpct) = c, r
        if _has(ct, ("infty", "base")) or _has(rt, ("infty", "base")):   # by structure; 52 answers 52_8
            return ct == rt or {ct[0], rt[0]} == {"base", "num"} and str(ct[1]) == str(rt[1])
        names = sorted(_vars(ct) | _vars(rt))
        if _literal(rt) is not None and _literal(ct) is None or _unsimplified(ct) and not _unsimplified(rt) \
                or names and _factored(ct) != _factored(rt):
            return False                                    # not final: "3+4" for 7, (x+2)(x+5) for x^2+7x+10
        rng = random.Random(2024)                           # fixed seed: reproducible verdicts
        defined, decimal = 0, _has(ct, ("dec",)) or _has(rt, ("dec",))
        for _ in range(N_POINTS if names else 1):
            env = {v: Fraction(rng.randint(1, 60), rng.randint(61, 97)) + rng.randint(-3, 3) for v in names}
            a, b = (self.defined(t, env) for t in (ct, rt))
            if a is None and b is None:                     # undefined on both sides: no evidence either way
                continue
            if a is None or b is None or not (isinstance(a, Fraction) and isinstance(b, Fraction)) and decimal or \
                    not names and isinstance(a, Fraction) != isinstance(b, Fraction):
                return False                                # 1.4142, 0.5\sqrt2, \sqrt{0.5}: never irrational
            if not any(_close(x, y) for x in (a, a / 100)[:1 + cpct] for y in (b, b / 100)[:1 + rpct]):
                return False
            defined += 1
        return defined > 0

    def same(self, c, r) -> bool:
        if c[0] != r[0]:        # a label on one side only is dropped: "x = 5", "f(x) = 5", "(p, q) = (3, 2)"
            c, r = (n[2][1] if n[:2] == ("rel", ("=",)) and _label(n[2][0]) else n for n in (c, r))
        if c[0] != r[0]:
            return False
        if c[0] == "expr":
            return self.expr_same(c, r)
        if c[0] == "rel":       # the same relations; a single = or != also with its sides swapped
            swaps = (c[2], c[2][::-1]) if c[1] in (("=",), ("!=",)) else (c[2],)
            return c[1] == r[1] and any(self.sides_same(s, r[2]) for s in swaps)
        if c[0] == "list":                                  # order-free: a multiset
            left = list(r[1])
            for x in c[1]:
                if (j := next((j for j, y in enumerate(left) if self.same(x, y)), None)) is None:
                    return False
                left.pop(j)
            return not left
        if c[0] == "tuple":                                 # ordered, with the same brackets
            return c[1:3] == r[1:3] and len(c[3]) == len(r[3]) and all(map(self.same, c[3], r[3]))
        return c == r                                       # choice letters, words

    def sides_same(self, c, r) -> bool:
        """Sides in order; two expressions as their difference, so that y = 2x + 3 matches y - 3 = 2x."""
        if len(c) == len(r) == 2 and all(n[0] == "expr" for n in c + r):
            return self.expr_same(*[("expr", ("sub", s[1][1], s[0][1]), False) for s in (c, r)])
        return len(c) == len(r) and all(map(self.same, c, r))

    def matches(self, answer: str, reference: str) -> bool:
        try:
            a = _clean(answer) if max(len(answer), len(reference)) <= 4 * MAX_ANSWER else ""   # both sides capped
            return bool(a) and (a == _clean(reference) or self.same(_parse(answer), _parse(reference)))
        except (_Reject, ArithmeticError):                  # unparseable, 1/0, too big, against the rules: no match
            return False


# ---------------------------------------------------------------- public API

def check(completion: str, reference: str) -> float:
    """verify() without its safety net: a bug in the parser raises here, so the tests call this."""
    finals, checker = list(dict.fromkeys(_finals(completion))), _Checker()   # distinct finals, in order
    return float(bool(finals) and all(checker.matches(f, reference) for f in finals)
                 or len(finals) > 1 and checker.matches(", ".join(finals), reference))   # disagreeing: one list


def verify(completion: str, reference: str) -> float:
    """1.0 if the completion's final answer equals the gold answer, else 0.0.  Never raises."""
    try:
        return check(completion, reference)
    except Exception:                                       # a parser bug must never stop training
        return 0.0


def reference(text: str) -> str:
    """A gold answer as training grades it: a worked solution's final answer (GSM8K's '#### 72', a last \\boxed{}),
    else the whole text."""
    return extract_answer(text) or text.strip()


def explain(answer: str | None) -> str:
    """How an answer is read: its normal form, or why it has none (then only the same text, cleaned, matches)."""
    if answer is None:
        return "no final answer found"
    try:
        form = re.sub(r"Fraction\((-?\d+), (\d+)\)", lambda m: m[1] + f"/{m[2]}" * (m[2] != "1"), repr(_parse(
            answer[:4 * MAX_ANSWER])))                      # Fraction(72, 1) as 72, Fraction(1, 2) as 1/2
        return f"{answer!r}, read as {form}"
    except (_Reject, ArithmeticError) as e:
        return f"{answer!r}, unparseable ({e or 'not an answer'}): only the same text matches"


if __name__ == "__main__":                          # by hand: argparse takes a gold answer like -3/4 for an option
    args, opts = [x for x in sys.argv[1:] if x != "--explain"], dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if args[:1] == ["--data"] and len(args) % 2 == 0 and set(opts) <= {"--data", "--answer-field", "--split"}:
        import datasets  # the file kinds train.py reads; its errors name the problem (verify.py imports no trainer)
        src, field, split = opts["--data"], opts.get("--answer-field", "answer"), opts.get("--split", "train")
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(src)[1])
        try:
            rows = (datasets.load_dataset(kind, data_files={split: src}, split=split) if kind else
                    datasets.load_from_disk(src))  # a save_to_disk folder (a DatasetDict: --split picks one)
        except Exception as e:
            sys.exit(f"verify.py: error: cannot read --data {src!r} ({type(e).__name__}); give a .jsonl, .json, .csv "
                     f"or .parquet file or a save_to_disk folder")
        rows = rows[split] if isinstance(rows, datasets.DatasetDict) else rows
        golds = [row[field] if field in row else functools.reduce(lambda r, k: r.get(k) if isinstance(r, dict) else
                 None, field.split("."), row) for row in rows]  # a dotted name reaches a nested column, as in train.py
        bad = [(i, g) for i, g in enumerate(golds) if g is None or "unparseable" in explain(reference(str(g)))]
        for i, gold in bad:
            print(f"row {i}: {field} " + ("is null" if gold is None else f"{gold!r} does not parse: only a completion "
                                                           f"with the same text matches it"))
        print(f"{len(rows) - len(bad)} of {len(rows)} gold answers in {field!r} parse")
        sys.exit(1 if bad else 0)
    if len(args) != 2:                              # --help: usage on stdout, exit 0; misuse: stderr, exit 2
        asked = args in (["-h"], ["--help"])
        print('usage: python verify.py "COMPLETION" "REFERENCE" [--explain]  (exit 0: right, 1: wrong; --explain, or a '
              'terminal: how both were read)\n       python verify.py --data FILE [--answer-field answer] [--split '
              'train]  (lists the gold answers that do not parse)', file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    completion, gold = args[0], reference(args[1])  # a worked solution grades by its final answer, as in training
    verdict = verify(completion, gold)
    print(f"extracted: {extract_answer(completion)!r}\nverdict  : {verdict}")
    if "--explain" in sys.argv or sys.stdout.isatty():
        print(f"answer   : {explain(extract_answer(completion))}\nreference: {explain(gold)}")
    sys.exit(0 if verdict else 1)                   # like grep: a script can test the verdict
