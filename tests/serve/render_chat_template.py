"""The reference for test_chat_template: renders chat templates with Jinja2 itself, configured as
Hugging Face transformers' apply_chat_template configures it (a sandboxed environment with
trim_blocks, lstrip_blocks and the loop controls; raise_exception, strftime_now and a tojson
that keeps non-ASCII text and the keys' order).

    python3 render_chat_template.py CASES.json OUT.json

CASES.json is a list of {"template": str, "vars": object}; OUT.json gets, for each case,
{"ok": rendered} or {"error": message, "raised": true when raise_exception was called}.
Exit status 3 when jinja2 is not installed (the test then skips with that message).
"""
import json
import sys
from datetime import datetime

try:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    print("jinja2 is not installed (Debian: apt-get install python3-jinja2)", file=sys.stderr)
    sys.exit(3)


class Raised(Exception):
    pass


def raise_exception(message):
    raise Raised(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    out = []
    for case in cases:
        try:
            out.append({"ok": env.from_string(case["template"]).render(**case["vars"])})
        except Raised as e:
            out.append({"error": str(e), "raised": True})
        except Exception as e:  # any other failure: the renderer under test must fail too
            out.append({"error": f"{type(e).__name__}: {e}", "raised": False})
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
