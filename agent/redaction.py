"""Redaction of secrets and size budgets for text that leaves the process.

Everything the analysis stage gathers (log tails, event messages, config summaries, alert
text) passes through :func:`redact` before it is stored in a context, put in a prompt or
logged. It errs on the side of removing too much: a redacted trace id costs little, a
leaked token costs a lot. What it recognises:

- PEM private-key blocks, PGP ones too (also when cut off before their END line);
- ``Authorization:`` headers and ``Bearer``/``Basic`` credentials: a header's value to the
  end of its line or, when the header is inside a (JSON) string, of that string, so the
  rest of a JSON line stays JSON;
- ``key=value`` / ``key: value`` / ``"key": "value"`` (``"key"=>"value"``, ``key := value``
  too) where the key names a secret
  (password, passphrase, token, secret, api key, access key, credential, cookie,
  signature, ...),
  or ends in "pass" (``SMTP_PASS``, ``smtpPass``, ``pass``, ``DBPASS``, ``$dbpass``; not
  ``BYPASS``, ``COMPASS``, ``PASSED``, ``PASSTHROUGH``),
  also as escaped JSON embedded in a string (``{\\"password\\":\\"...\\"}``); after
  a separator followed by a space (``password: my secret phrase``, ``pwd = a b``) an
  unquoted value runs to the end of the line (or of the string it is in), since YAML and
  config values hold spaces; in a connection string (``Server=db;Password=pa ss;``) a
  password runs to the next ``;``; under such a key, a ``{`` or ``[`` that opens a structure,
  or the first key of a YAML mapping on the next line, is no value: the keys inside are
  checked on their own; a key that refers to a secret (``secretKeyRef``, ``secretRef``,
  ``secretName``, ``existingSecret``) or names one (any name ending in "name": Azure's
  ``SharedAccessKeyName``, ``keyName``) keeps its value, a name that helps diagnosis;
- the value of a name/value pair whose name names a secret, as Kubernetes env vars are
  written (``{"name": "DB_PASSWORD", "value": "..."}``, ``- name: DB_PASSWORD`` over
  ``value: ...``);
- YAML block scalars under such a key (``password: |``, ``token: >-``): the lines after
  it deeper than the key (than its line, after a log prefix), blank lines included, down
  to the depth of the first;
- the items of a list under such a key: a YAML block sequence (``tokens:`` over
  ``- abc123``) or a flow sequence (``tokens: [abc, def]``, ``{"tokens": ["abc"]}``), the
  items of lists nested in it too (``[["a", "b"], ["c"]]``), at any depth (deeper than a
  regex reaches, to its closing bracket within 64 KiB); an item that is a mapping
  (``- name: x`` over ``value: s3cret``, ``{"name": "x", "value": "s3cret"}``) keeps its
  keys and the values that name it (name, namespace, kind, user, username: a list of
  ``- name: regcred`` stays), its other values go; a bare item in a JSON list is replaced
  by a string, so JSON stays JSON;
- command-line flags named for a secret with their value after a space
  (``--password Hunter2``, ``--api-key``, ``--client-secret``, ``-storepass``), not
  flags that name where a secret is (``--token-file /path``); a MySQL/MariaDB client's
  password attached to ``-p`` (``mysql -uroot -pHunter2``), in their command lines only;
  redis's: ``--requirepass``/``--masterauth`` flags, ``requirepass``/``masterauth``
  directives where they are config (alone on a line of a redis.conf dump or in a string,
  after ``CONFIG SET``, in ``CONFIG GET``'s answer, as key=value; not in prose:
  "requirepass is not set"), ``redis-cli -a``/``--pass`` in
  redis-cli's command lines only (``tar -a`` keeps its argument); the password of an
  ``AUTH [user] password`` (also HELLO's) as MONITOR quotes it (``"AUTH" "pw"``), after a
  redis-cli prompt or in a redis-cli command line, not the word elsewhere ("AUTH failed");
  ``ACL SETUSER``'s ``>password`` and ``<password`` rules and ``#hash``/``!hash`` (an
  unsalted SHA-256), and the same in a ``users.acl`` or ``ACL LIST`` line (``user alice
  on >pw ~* +@all``: "user", a name, nothing but ACL rules), in a selector too
  (``(>pw ~tmp:*)``); the hashes ``ACL GETUSER`` lists under "passwords";
- openssl's pass phrase arguments (``-passin pass:X``, ``-passout``, ``-pass``): after
  ``pass:`` to the next blank, or to the closing quote of a quoted argument; ``env:VAR``,
  ``file:path``, ``fd:N`` and ``stdin`` say where it is and are kept; ``-k password``
  and ``-K key`` in openssl's command lines only (``curl -k`` keeps its URL), not
  ``-kfile path``;
- passwords in URLs (``scheme://user:password@host``), up to the last ``@`` before
  whitespace or a quote, since logged URLs often carry an unencoded ``/`` or ``@``;
- well-known token shapes: JWTs, AWS access key ids, Google API keys, GitHub, GitLab
  (``glpat-``...), Slack, Stripe (``sk_live_``, ``rk_live_``, ``whsec_``), npm, Hugging
  Face and Azure SAS tokens (an Azure ``AccountKey=`` or ``sig=`` as key=value);
- long base64-like strings mixing upper case, lower case and digits (40+ characters).

:func:`clip` keeps a text within a byte budget (UTF-8), cutting whole characters only.
Pure functions; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

REDACTED = "[REDACTED]"

_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r".*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)
_QUOTED = r"\"(?:[^\"\\\r\n]|\\.)*\"?|'(?:[^'\\\r\n]|\\.)*'?"


# A JSON string escaped inside another string (\"...\" or \\\"...\\\"): it ends at the same
# run of backslashes and a quote, not preceded by one more backslash (an escaped quote
# inside it has more); unterminated, it runs to the end of the line.
def _escaped_quoted(esc: str) -> str:
    return rf'(?P<{esc}>\\+)"(?:(?!(?<!\\)(?P={esc})")[^\r\n])*(?:(?P={esc})")?'


_ESCAPED_QUOTED = _escaped_quoted("esc")
# Between key and value: the key's closing quote, escaped or not, then : or =; ``gap``:
# a space after it, as in YAML and config files, where a bare value holds spaces.
# ``nl``: the key ends its line, as a YAML mapping's does. Ruby's and PHP's => and Go's :=
# too: with = alone, the > or = was taken for the whole value and the secret after it left;
# only before a blank or a quote, as they are written: password=>x is a value ">x".
_SEPARATOR = (
    r"(?P<sep>(?:\\*[\"'])?\s*(?:(?:=>|:=)(?=[ \t\"']|\\+\")|[:=])"
    r"(?:(?P<gap>[ \t]+)|(?P<nl>[ \t]*\r?\n\s*)|))"
)
# A bare value after a gap: to the end of the line, or of the (JSON) string it is in,
# whose closing quote is not preceded by a backslash of its own.
_PHRASE = r"[^\s\"'\\][^\r\n\"\\]*(?:\\+(?![\\\"])[^\r\n\"\\]*)*"
# A bare value without a gap: to whitespace, a quote or , ; & (as in a query string); a
# backslash escaping the quote that ends a string it is in is no part of it.
_BARE = r"(?:[^\s,;&\"'\\]|\\+(?![\\\"]))+"
# A header's value runs to the end of the line, unless it is a quoted (JSON) string, or
# the header is inside one (see _header).
_AUTH_HEADER = re.compile(
    r"(?im)\b(?P<key>(?:proxy-)?authorization|x-api-key|api-key|cookie|set-cookie)"
    + _SEPARATOR
    + r"(?P<value>(?:"
    + _ESCAPED_QUOTED
    + "|"
    + _QUOTED
    # A quoted value ends at its quote only if nothing of it follows: "abc"def is no
    # quoted value, its def would be left.
    + r")(?![^\s,;}\]\\])|[^\r\n]*)"
)
# A double quote and the backslashes before it: which string it opens or closes, if any,
# is in their number (see _string_close).
_QUOTE_RUN = re.compile(r'(\\*)"')
# "Bearer <token68>"; "Basic <base64>" only when it looks encoded, so prose survives. The
# credential is on the scheme's line: across a line break, a value that ends in "Bearer"
# took the next line's key for its token, and that line's secret was left.
_SCHEME_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)([ \t]+)([A-Za-z0-9\-._~+/]{8,}=*)")
_SENSITIVE = (
    r"(?:passw(?:or)?d|passwd|pwd|pass[_-]?phrase|secret|token|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|"
    r"account[_-]?key|shared[_-]?access[_-]?key|credentials?|auth|cookie|session[_-]?id|"
    r"signature|sig|key)"
)
# "pass" names a password only as a name's last part: SMTP_PASS, smtp.pass, smtpPass, or
# alone in lower case (nodemailer's auth: {user, pass}), or glued to a name in its own
# case (DBPASS, MYSQLPASS, $dbpass) but for the English words that end so (BYPASS,
# COMPASS, SURPASS, TRESPASS, OVERPASS, UNDERPASS); PASSED and PASSTHROUGH go on, and so
# does a test runner's "--- PASS: TestX".
# (?=[pP]) first: the lookbehinds at every character of every key cost a tenth more.
_PW_SUFFIX = (
    r"(?=[pP])(?:(?<=[_.-])(?-i:pass|Pass|PASS)|(?<![\w.-])(?-i:pass)|(?<=[a-z0-9])(?-i:Pass)"
    r"|(?<!by)(?<!com)(?<!sur)(?<!tres)(?<!over)(?<!under)"
    r"(?-i:(?<=[a-z0-9])pass|(?<=[A-Z0-9])PASS))"
)
# A name with a secret word anywhere in it, or ending in "pass".
_SECRET_NAME = r"[\w.-]{0,40}?(?:" + _SENSITIVE + r"[\w.-]{0,40}?|" + _PW_SUFFIX + ")"
# A key that refers to a secret (secretKeyRef, secretRef, secretName, existingSecret) or
# names one (Azure's SharedAccessKeyName=RootManageSharedAccessKey, keyName, token_name)
# has a name for value, which helps diagnosis and hides nothing.
_REFERENCE_KEY = (
    r"(?<![_.-]ref)(?<!(?-i:[a-z0-9]Ref))(?<!name)(?<!existingsecret)(?<!existing_secret)"
)
# No value but a structure whose own keys are checked: an opening { before a quote, a
# closer that ends the value ("{]0000" is a value), the line's end or another opener that
# is itself before a quote or the line's end ("[{0000" is a value: nothing in it is a key
# to check); a [ (or [[) before the end, such
# a { or a closer that ends the value ("[]0000" is a value), when no flow sequence is there
# (see _FLOW_SEQUENCE, tried first); a [[ before a scalar is a value, whole; after the key's
# line, a YAML mapping's first key or a sequence's "- " (see _block_values).
_STRUCTURE = (
    r"(?!\{[ \t]*(?:\\*[\"']|[}\]](?![^\s,}\]\"'\\])|\r?\n|\Z|[{\[][ \t]*(?:\\*[\"']|\r?\n|\Z))"
    r"|\[(?:\s*\[)*\s*(?:\](?![^\s,}\]\"'\\])|\Z|\{[ \t]*(?:\\*[\"']|\r?\n|\Z)))"
)
_NO_KEY_BELOW = r"(?(nl)(?![^\s\"']+:(?:\s|\Z)|-(?:\s|\Z)))"
# An item of a flow sequence of scalars (["abc", "def"], [abc, def]): quoted, or bare to
# the next , or bracket, spaces inside it and all.
_FLOW_CHAR = r"(?:[^\s,\[\]{}\"'\\]|\\+(?![\\\"]))"
_FLOW_BARE = _FLOW_CHAR + r"(?:(?:[^,\[\]{}\r\n\"'\\]|\\+(?![\\\"]))*" + _FLOW_CHAR + ")?"


def _flow_scalar(tag: str) -> str:
    return _escaped_quoted(tag) + "|" + _QUOTED + "|" + _FLOW_BARE


def _balanced(tag: str, depth: int) -> str:
    """What may stand between a bracket and the one that closes it: strings, whose brackets
    are no brackets, other characters and, ``depth`` levels deep, bracketed parts."""
    parts = [_escaped_quoted(tag), _QUOTED, r"[^{}\[\]\"'\\]", r"\\+(?![\\\"])"]
    if depth:
        parts.append(r"\{" + _balanced(tag + "m", depth - 1) + r"\}")
        parts.append(r"\[" + _balanced(tag + "s", depth - 1) + r"\]")
    # (?>...*), not ...*+: CPython 3.11's possessive repeat of a group that captures
    # raised SystemError ("the span of capturing group is wrong", python/cpython#101955).
    return "(?>(?:" + "|".join(parts) + ")*)"


# A flow mapping, three levels deep at most, as a list's item: [{"name": "x", ...}].
def _flow_mapping(tag: str) -> str:
    return r"\{" + _balanced(tag, 3) + r"\}"


# Under a secret key every scalar item is a secret, in nested lists too ([["a"], ["b"]]);
# one already redacted is left as it is. An item that is a mapping keeps only the values
# that name it (see _mapping_item). The list ends at its ] or where a text is cut off on
# its line: else ("[00000" over a newline) the value is no sequence.
_FLOW_SEQUENCE = (
    r"(?P<seq>(?!\[REDACTED\])\[\s*(?>(?:"
    + _flow_mapping("sm")
    + r"|\["
    + _balanced("sn", 3)
    + r"\]|"
    + _flow_scalar("iesc")
    + r")(?:\s*,\s*|\s*(?=\])|[ \t]*\Z))+"
    # A list is the whole value: [a]b is a scalar (its b was left).
    r"(?:\](?![^\s,}\]\"'\\])|\Z))"
)
# key: an identifier containing a secret word; separator; value quoted or bare.
_KEY = r"(?i)(?P<key>\b" + _SECRET_NAME + ")" + _REFERENCE_KEY + _SEPARATOR + _NO_KEY_BELOW
_SCALAR_VALUE = (
    _STRUCTURE
    + "(?:"
    + _ESCAPED_QUOTED
    + "|"
    + _QUOTED
    + r"|(?(gap)"
    + _PHRASE
    + r"|"
    + _BARE
    + "))"
)
# A [ that _FLOW_SEQUENCE cannot take (nested deeper than its regex reaches, or no list)
# is ``deep``: _key_values finds where it closes, or else takes a scalar (_KEY_SCALAR).
_KEY_VALUE = re.compile(
    _KEY
    + r"(?P<value>"
    + _FLOW_SEQUENCE
    + r"|(?P<deep>(?=\[(?!REDACTED\])))|"
    + _SCALAR_VALUE
    + ")"
)
_KEY_SCALAR = re.compile(_KEY + r"(?P<value>" + _SCALAR_VALUE + ")")
# A structure's parts, to find where it closes: brackets, strings (whose brackets are
# none), the rest.
_STRUCTURE_TOKEN = re.compile(
    r"(?P<open>[\[{])|(?P<close>[\]}])|"
    + _escaped_quoted("tesc")
    + "|"
    + _QUOTED
    + r"|[^\[\]{}\"'\\]+|.",
    re.DOTALL,
)
# What may follow a value's end ("[]0000" is a scalar, not a list).
_VALUE_END = re.compile(r"(?![^\s,}\]\"'\\])")
# A deeper structure is not looked for to its end: beyond, its value is read as a scalar.
_STRUCTURE_SCAN = 65536
# A list's parts: its mappings, its scalars (those of nested lists too).
_SEQUENCE_PARTS = re.compile(r"(?P<map>" + _flow_mapping("pm") + ")|" + _flow_scalar("iesc"))
# A flow mapping's parts: a key, its value if a scalar, or a scalar that is no key's value.
_MAPPING_PARTS = re.compile(
    r"(?P<key>(?P<kq>\\*[\"'])?(?P<name>[\w.-]+)(?(kq)(?P=kq)))[ \t]*:(?P<ksep>\s*)"
    r"(?P<value>" + _flow_scalar("vesc") + ")?|" + _flow_scalar("iesc")
)
# The keys that name a list's item rather than hold its secret: imagePullSecrets' and a
# ServiceAccount's secrets are lists of {name: ...}.
_ITEM_NAME_KEYS = frozenset({"name", "namespace", "kind", "user", "username"})
# A JSON key's closing quote (with the backslashes escaping it in a string).
_KEY_QUOTE = re.compile(r'\\*"')
# A flag named for a secret (not --token-file, which names where one is), its value after
# a space or =; a long flag after it is the next flag, not the value (a prompted password).
# With =, most are key=value too, but not -storepass: "pass" glued to a word is none.
_FLAG = re.compile(
    r"(?i)(?<![\w-])(?P<key>--?[\w.-]{0,40}?"
    r"(?:passw(?:or)?d|passwd|pwd|passphrase|(?:store|key)pass|(?<=[_-])pass|secret|token|"
    r"api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|account[_-]?key|credentials?|"
    r"requirepass|masterauth))"
    r"(?P<sep>[ \t]+|=)(?P<value>" + _QUOTED + r"|(?!--)[^\s\"']+)"
)
# openssl's pass phrase argument (-passin pass:X, -passout pass:X, -pass pass:X): after
# "pass:" to the next blank, , ; & and all, or, when the argument is quoted ("pass:a b"),
# to its closing quote. Its env:VAR, file:path, fd:N and stdin name where one is: kept.
_OPENSSL_PASS = re.compile(
    r"(?<![\w.-])(?:(?P<q>\\*[\"'])pass:(?=[^\s\"'\\])(?:(?!(?P=q))[^\r\n])+"
    r"|pass:(?:" + _QUOTED + r"|(?:[^\s\"'\\]|\\+(?![\\\"]))+))"
)
_OPENSSL_SOURCE = re.compile(r"[\"']?(?:(?:pass|env|file|fd):|stdin(?![^\s\"']))")
# A YAML block scalar (``password: |``, ``token: >-``) or block sequence (``tokens:`` over
# ``- abc123``) under a key naming a secret: the value is on the lines after it (see
# _block_values).
# Found by its indicator, rare in logs, then its key checked: a search for the key first,
# at every word, doubled the cost of redaction. One scan for both: a second one cost more.
_BLOCK_INDICATOR = re.compile(
    r"[ \t]*:(?:[ \t]+[|>](?:[1-9][+-]?|[+-][1-9]?)?|(?P<seq>))(?:[ \t]+#[^\r\n]*)?[ \t]*\r?\n"
    r"(?(seq)(?:[ \t]*\r?\n)*(?=[ \t]*-(?:[ \t]|\r?\n)))"
)
# A sequence item that is a mapping (``- name: regcred``): its keys are checked on their own.
_MAPPING_ITEM = re.compile(r"(?:[^\s\"']+|\"[^\"\r\n]*\"|'[^'\r\n]*'):(?:\s|\Z)")
# A line of a mapping that is a list's item: the "- " before it, its key, its value.
_ITEM_LINE = re.compile(
    r"(?:-[ \t]+)*(?:(?P<q>[\"']?)(?P<name>[^\s\"':{}\[\],#]+)(?P=q)[ \t]*:(?:[ \t]+|\Z))?"
    r"(?P<rest>.*)"
)
_BLOCK_KEY = re.compile(r"(?<![\w.-])[\"']?(?P<key>[\w.-]+)[\"']?\Z")
_SENSITIVE_WORD = re.compile("(?i)" + _SENSITIVE + "|" + _PW_SUFFIX + r"\Z")
# What may precede a key on its line in YAML: indentation, the "- " of list items.
_YAML_LEAD = re.compile(r"[ \t]*(?:-[ \t]+)*")


# A MySQL/MariaDB client's password attached to its short flag (mysql -uroot -pHunter2),
# only in one of their command lines: elsewhere -p is a port, a path or "make parents".
# The command line ends at the line's end or a shell separator outside quotes.
# A tool's arguments: to a shell separator outside quotes or the line's end.
_COMMAND_ARGS = r"(?=[\s\"',\]])(?P<args>(?:" + _QUOTED + r"|(?![ \t]+(?:[|;]|&&))[^\r\n\"'])*)"


def _command_line(name: str) -> re.Pattern[str]:
    """The command lines of the tool ``name``, its arguments as ``args``: in a shell line,
    a quoted ``sh -c`` one or an argv list. The name first, what is before it (a line's
    start, a separator or a quote, a bin/) looked behind after: a path before it, tried at
    every character, cost as much as all of openssl's rule."""
    return re.compile(
        rf"{name}(?:(?<=bin/{name})|(?<=[\s\"'\[,;|&(=]{name})|(?<![^\n]{name}))" + _COMMAND_ARGS
    )


_MYSQL_COMMAND = re.compile(
    r"(?:^|(?<=[\s\"'\[,;|&(=]))(?:[\w./-]*bin/)?"
    r"(?:mysql(?:admin|dump|import|check|show|slap|pump|binlog|sh)?|mariadb(?:-?[a-z]+)?)"
    + _COMMAND_ARGS
)
# Quoted (-p"my pass") after a space only: "-p", "db" in an argv list is a prompt.
_MYSQL_PASSWORD = re.compile(
    r"(?:(?<=\s)-p(?:" + _QUOTED + r")|(?<=[\s\"'\[,])-p(?:[^\s\"'\\]|\\(?!\"))+)"
)
# openssl's -k password (enc's older form of -pass pass:X) and -K key (the key itself, in
# hex), in its command lines only: elsewhere -k is "insecure" (curl) or "keep"; -kfile
# names where one is, kept.
_OPENSSL_COMMAND = _command_line("openssl")
_OPENSSL_KEY = re.compile(
    r"(?<=[\s\"'\[,])(?P<flag>-[kK])(?:(?P<sep>[ \t]+)(?:" + _QUOTED + r"|[^\s\"']+)"
    r"|(?P<item>[\"'],[ \t]*[\"'])[^\"'\r\n]+)"
)
# A redis-cli's password after -a or --pass, in its command lines only (-a is "all" or
# "append" to most tools), after a space or as the next item of an argv list.
_REDIS_CLI_COMMAND = _command_line("redis-cli")
_REDIS_CLI_PASSWORD = re.compile(
    r"(?<=[\s\"'\[,])(?P<flag>-a|--pass)(?:(?P<sep>[ \t]+|=)(?:" + _QUOTED + r"|[^\s\"']+)"
    r"|(?P<item>[\"'],[ \t]*[\"'])[^\"'\r\n]+)"
)
# Redis's own directives where they are config: "requirepass pw" alone on its line (a
# redis.conf dump, also as a line of a JSON string) or alone in a string ('requirepass
# pw', as an init script echoes it into the file); after CONFIG SET on its line, among its
# other parameters, quoted as MONITOR shows it or as an argv list's items; as key=value or
# key: value anywhere. Elsewhere it is prose: "requirepass is not set" (see
# _redis_directive). The name first, its context checked after: looked behind at every
# character, it cost a tenth of all redaction on a log tail that names it.
_REDIS_DIRECTIVE = re.compile(
    r"(?P<key>[rRmM](?i:equirepass|asterauth))(?P<q>[\"']?)"
    r"(?:(?P<ksep>[ \t]*[:=][ \t]*)(?:" + _QUOTED + r"|[^\s\"']+)"
    r"|(?P<sep>[ \t]+|[ \t]*,[ \t]*)(?P<value>" + _QUOTED + r"|[^\s\"'\\]+))"
)
# What ends a directive's line: its end, a \n or \r in a JSON string, a quote.
_DIRECTIVE_END = re.compile(r"[ \t]*(?:\r?\n|\r|\Z|\\[rn]|[\"'])")
_CONFIG_SET = re.compile(r"(?i)(?<![\w-])([\"']?)config\1[ \t,]+\1set\1[ \t,]")
# CONFIG GET's answer, as redis-cli prints it: 1) "requirepass" over 2) "pw".
_REDIS_CONFIG_GET = re.compile(
    r"(?<=\d\) )(?P<key>\"[rRmM](?i:equirepass|asterauth)\"\r?\n[ \t]*\d+\)[ \t]*)"
    r"\"(?:[^\"\\\r\n]|\\.)+\""
)
# AUTH [user] password, HELLO's AUTH user password: the password is the last of one or
# two arguments. Only where it is a redis command: quoted as MONITOR shows it ("AUTH"
# "pw"), after a redis-cli prompt (host:6379> AUTH pw), in a redis-cli command line (also
# as an argv list); elsewhere AUTH is a word ("AUTH failed for user bob").
_REDIS_ARG = r"(?:" + _QUOTED + r"|[^\s\"',\]]+)"
_REDIS_AUTH_ARGS = (
    r"(?P<first>" + _REDIS_ARG + r")(?:(?P<gap>{sep})(?P<second>" + _REDIS_ARG + r"))?"
)
# The word first, its quote or > looked behind it after, its prompt checked last (see
# _redis_auth): with the lookbehinds first, tried at every character, or with (?i) instead
# of a class to search for, it cost a tenth more on a log tail that says "auth".
_REDIS_AUTH = re.compile(
    r"(?P<cmd>[aA][uU][tT][hH]"
    r"(?:(?<=(?<![\w-])\"....)\"|(?:(?<=> ....)|(?<=>....))(?![\w-]))[ \t]+)"
    + _REDIS_AUTH_ARGS.format(sep=r"[ \t]+")
)
_REDIS_PROMPT = re.compile(r"(?:^|\s)[\w.-]+:\d{1,5}(?:\[\d{1,2}\])?> ?\Z")
_REDIS_CLI_AUTH = re.compile(
    r"(?i)(?<![\w-])(?P<cmd>([\"']?)auth\2(?:[ \t]*,[ \t]*|[ \t]+))"
    + _REDIS_AUTH_ARGS.format(sep=r"[ \t]*,[ \t]*|[ \t]+")
)
# ACL SETUSER's >password and <password rules (adding or removing a password both name
# it), in a command or as MONITOR quotes it; its #hash and !hash too: an unsalted SHA-256
# of a password is a dictionary attack away from it, and tells the model nothing. Also as
# a selector's first rule, after its "(": redis refuses them there, but a rejected command
# or a hand-edited users.acl is logged all the same.
_REDIS_ACL_SETUSER = re.compile(
    r"(?i)(?<![\w-])([\"']?)acl\1[ \t]+\1setuser\1(?P<args>[ \t,][^\r\n]*)"
)
_ACL_PASSWORD = re.compile(
    r"(?<=[\s,])(?P<q>[\"'])?(?P<sel>\()?(?:(?P<op>[<>])(?(q)(?:(?!(?P=q))[^\r\n\\]|\\.)*|[^\s\"']+)"
    r"|(?P<hop>[#!])[0-9a-fA-F]{64}(?![\w]))"
)
# ACL GETUSER's answer lists a user's password hashes, bare, under "passwords": as redis-cli
# prints it (3) "passwords" over 4) 1) "<hash>"), raw (one a line) or in RESP3 ("passwords"
# => 1) "<hash>"). The hashes are what ACL LIST shows as #hash: a dictionary away from the
# password.
_REDIS_GETUSER_PASSWORDS = re.compile(
    r"(?m)^[ \t]*(?:\d+[)#][ \t]*)?(?P<q>\"?)passwords(?P=q)[ \t]*(?:=>[ \t]*|\r?\n)"
    r"(?P<items>(?:[ \t]*(?:\d+[)~][ \t]*)*\"?[0-9a-fA-F]{64}\"?[ \t]*(?:\r?\n|\Z))+)"
)
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# A users.acl line, or ACL LIST's (1) "user alice on #... ~* +@all"): "user", a name and
# nothing but ACL rules after it, so prose ("user bob logged in") is none.
_ACL_RULE = (
    r"(?:on|off|nopass|resetpass|reset|resetkeys|resetchannels|allkeys|allchannels"
    r"|allcommands|nocommands|(?:skip-)?sanitize-payload|[~%&+\-<>#!]\S*"
    # A selector, to the ")" that ends a word: a password in it may hold one.
    r"|\((?:[^)\r\n]|\)(?=[^\s\"']))*\)"
    r"|\[REDACTED\])"
)
_REDIS_ACL_USER = re.compile(
    r"(?m)^[ \t]*(?:\d+\)[ \t]*)?(?P<q>[\"']?)user[ \t]+[^\s\"']+"
    r"(?P<args>(?:[ \t]+" + _ACL_RULE + r")+)[ \t]*(?P=q)[ \t]*\r?$"
)
# A password in a connection string (Server=db;User ID=sa;Password=pa ss;), after a ";"
# or before one: the value runs to the next ";", spaces and all, as ADO.NET, ODBC and
# Npgsql read it; ODBC's may be in braces (PWD={a;b}).
_CONNECTION_PASSWORD = re.compile(
    r"(?i)(?<![\w.-])(?P<key>passw(?:or)?d|pwd)[ \t]*=[ \t]*"
    r"(?P<value>\{[^}\r\n]*\}?|(?:[^;\r\n\"'\\{ \t]|\\(?![\\\"]))(?:[^;\r\n\"'\\]|\\(?![\\\"]))*)"
)
# A name/value pair whose name names a secret, as Kubernetes env vars are written in the
# manifests and objects that logs and events quote: {"name":"DB_PASSWORD","value":"..."},
# {name: DB_PASSWORD, value: ...}, and "- name: DB_PASSWORD" with "value: ..." below it.
_OPTIONAL_QUOTE = r"(?:\\*[\"'])?"
_NAMED_VALUE = re.compile(
    r"(?i)(?P<key>(?<![\w.-])name"
    + _OPTIONAL_QUOTE
    + r"[ \t]*[:=][ \t]*"
    + _OPTIONAL_QUOTE
    + _SECRET_NAME
    + _OPTIONAL_QUOTE
    + r"[ \t]*,?\s*"
    + _OPTIONAL_QUOTE
    + r"value)"
    + _SEPARATOR
    + r"(?P<value>"
    + _ESCAPED_QUOTED
    + "|"
    + _QUOTED
    + r"|(?(gap)"
    + _PHRASE
    + r"|"
    # To the next blank: the value, not a , or } inside it, ends it (a secret "}0" or "a,b"
    # leaked its tail); only the , } ] closing a flow mapping after it are left out.
    + r"(?:[^\s\"'\\]|\\+(?![\\\"]))*(?:[^\s,;&\"'\\}\]]|\\+(?![\\\"]))"
    + "))"
)
# Greedy to the last @: a password cut at its own / or @ would leak the rest of it.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@\"']*):([^\s\"']+)@")
# One \b for all but the JWT: tried at every character, each alternative's own \b cost a
# fifth more on a log tail.
_TOKENS = re.compile(
    r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"  # JWT (a payload {} is e30)
    r"|\b(?:(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"  # Google API key
    r"|gh[pousr]_[A-Za-z0-9]{20,}\b"  # GitHub
    r"|github_pat_[A-Za-z0-9_]{20,}\b"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|gl(?:pat|dt|rt|ptt|soat|oas|cbt|ft|imt|agent)-"  # GitLab, the new ones in parts
    r"[0-9A-Za-z_-]{20,}(?:\.[0-9A-Za-z_-]+)*"
    r"|(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,}"  # Stripe secret and restricted keys
    r"|whsec_[0-9A-Za-z+/]{24,}"  # Stripe webhook signing secret
    r"|npm_[0-9A-Za-z]{36}(?![0-9A-Za-z])"
    r"|hf_[0-9A-Za-z]{30,}"  # Hugging Face
    r"|sv=\d{4}-\d{2}-\d{2}&[^\s\"']*sig=[^\s&\"']+)"  # Azure SAS query
)
_LONG_OPAQUE = re.compile(r"[A-Za-z0-9+/_-]{40,}={0,2}")


def _opaque(m: re.Match[str]) -> str:
    s = m.group(0)
    mixed = any(c.isupper() for c in s) and any(c.islower() for c in s)
    return REDACTED if mixed and any(c.isdigit() for c in s) else s


def _scheme_credential(m: re.Match[str]) -> str:
    value = m.group(3)
    if m.group(1).lower() == "basic" and value.isalpha() and value.islower():
        return m.group(0)  # "basic authentication", not a credential
    return f"{m.group(1)}{m.group(2)}{REDACTED}"


def _redacted_scalar(item: str, esc: str | None, bare: str) -> str:
    """A scalar replaced, its quotes kept; a bare one (a number) quoted as ``bare`` says: a
    JSON list stays JSON."""
    quote = f'{esc}"' if esc is not None else item[0] if item[0] in ("'", '"') else bare
    return f"{quote}{REDACTED}{quote}"


def _mapping_part(m: re.Match[str], bare: str) -> str:
    if m.group("key") is None:
        return _redacted_scalar(m.group(0), m.group("iesc"), bare)
    value = m.group("value")
    if value is None or m.group("name").lower() in _ITEM_NAME_KEYS:
        return m.group(0)
    kq = m.group("kq")
    quote = kq if kq and kq[-1] == '"' else bare
    head = m.group(0)[: m.start("value") - m.start()]
    return head + _redacted_scalar(value, m.group("vesc"), quote)


def _sequence(seq: str, bare: str) -> str:
    """The items of a list under a secret key replaced: every scalar, nested lists' too; a
    mapping's values but those that name it (see _ITEM_NAME_KEYS)."""

    def part(p: re.Match[str]) -> str:
        if p.group("map") is not None:
            return _MAPPING_PARTS.sub(lambda q: _mapping_part(q, bare), p.group("map"))
        if p.group(0) == "REDACTED":  # [REDACTED], an item already replaced
            return p.group(0)
        return _redacted_scalar(p.group(0), p.group("iesc"), bare)

    return _SEQUENCE_PARTS.sub(part, seq)


def _key_value(m: re.Match[str]) -> str:
    seq = m.groupdict().get("seq")  # _KEY_VALUE's only
    if seq is not None:
        key_quote = _KEY_QUOTE.match(m.group("sep"))
        bare = key_quote.group(0) if key_quote else ""
        return f"{m.group('key')}{m.group('sep')}{_sequence(seq, bare)}"
    value = m.group("value")
    esc = m.group("esc")
    if esc is not None and value.startswith(esc):
        quote = f'{esc}"'
    else:
        quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{m.group('key')}{m.group('sep')}{quote}{REDACTED}{quote}"


def _structure_end(text: str, pos: int) -> int | None:
    """Where the structure that opens at ``pos`` closes; None if not within reach, or if a
    bracket closes what it did not open ("[0000}" is a scalar)."""
    closers: list[str] = []
    for t in _STRUCTURE_TOKEN.finditer(text, pos, pos + _STRUCTURE_SCAN):
        if t.group("open") is not None:
            closers.append("]" if t.group("open") == "[" else "}")
        elif t.group("close") is not None:
            if closers.pop() != t.group("close"):
                return None
            if not closers:
                return t.end() if _VALUE_END.match(text, t.end()) else None
    return None


def _deep_sequence(seq: str, bare: str) -> str:
    """A list nested deeper than _sequence's regexes reach, replaced as _sequence does: the
    text between its brackets by what holds it, a list's scalars or a mapping's values."""
    out: list[str] = []
    stack: list[str] = []
    start = 0
    for t in _STRUCTURE_TOKEN.finditer(seq):
        bracket = t.group("open") or t.group("close")
        if bracket is None:
            continue
        run = seq[start : t.start()]
        if stack and stack[-1] == "{":
            run = _MAPPING_PARTS.sub(lambda q: _mapping_part(q, bare), run)
        elif stack:
            run = _sequence(run, bare)
        out.append(run + bracket)
        if t.group("open") is not None:
            stack.append(bracket)
        elif stack:
            stack.pop()
        start = t.end()
    out.append(seq[start:])  # nothing: the list ends at its closing bracket
    return "".join(out)


def _key_values(text: str) -> str:
    """``text`` with the value of each key naming a secret replaced: _KEY_VALUE's, and a
    list nested deeper than its regex reaches, every scalar in it, to its closing bracket."""
    out: list[str] = []
    pos = 0
    # Searched from where the last value ended: a key inside a list replaced whole, its value
    # run past the list's end, would hide a key after it.
    while (m := _KEY_VALUE.search(text, pos)) is not None:
        out.append(text[pos : m.start()])
        pos = m.end()
        if m.group("deep") is None:
            out.append(_key_value(m))
            continue
        end = _structure_end(text, m.end())
        if end is not None:
            key_quote = _KEY_QUOTE.match(m.group("sep"))
            bare = key_quote.group(0) if key_quote else ""
            out.append(m.group(0) + _deep_sequence(text[m.end() : end], bare))
            pos = end
            continue
        scalar = _KEY_SCALAR.match(text, m.start())
        if scalar is None:  # a structure: the keys in it are checked on their own
            out.append(m.group(0))
        else:
            out.append(_key_value(scalar))
            pos = scalar.end()
    out.append(text[pos:])
    return "".join(out)


def _string_close(prefix: str) -> int | None:
    """How many backslashes go before the quote that closes the innermost string, plain or
    escaped in another (``\\"``), that ``prefix`` ends in; None if in none. A string n
    levels deep closes with 2**(n-1) - 1 of them (mod 2**n); other quotes in it have more."""
    runs = [len(q) for q in _QUOTE_RUN.findall(prefix)]
    close, level = None, 0
    while True:
        own = [i for i, run in enumerate(runs) if run % (2 * level + 2) == level]
        if len(own) % 2 == 0:
            return close
        close, level, runs = level, 2 * level + 1, runs[own[-1] + 1 :]


def _header(m: re.Match[str]) -> str:
    """A header's value replaced: to the end of the line, or, when an unquoted value is
    inside a string (``"msg":"sent Authorization: Bearer x","user":"bob"``), to the end
    of that string, so that the rest of a JSON line stays JSON."""
    value, esc = m.group("value"), m.group("esc")
    # A quote that is not closed on the line opens no string: 'abc in a JSON string.
    quoted = (value[:1] in ('"', "'") and len(value) > 1 and value[-1] == value[0]) or (
        esc is not None and len(value) > 2 * len(esc) + 1 and value.endswith(f'{esc}"')
    )
    if not quoted:
        text = m.string
        close = _string_close(text[text.rfind("\n", 0, m.start()) + 1 : m.start("value")])
        if close is not None:
            rest = ""
            for q in _QUOTE_RUN.finditer(value):
                run = len(q.group(1))
                if run < close or run % (2 * close + 2) == close:
                    rest = value[q.end() - 1 - close :]
                    break
            return f"{m.group('key')}{m.group('sep')}{REDACTED}{rest}"
    return _key_value(m)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _lines(text: str, pos: int) -> Iterator[tuple[int, str, str]]:
    """From ``pos``: (end, line, its body without the line break) of each line."""
    while pos < len(text):
        nl = text.find("\n", pos)
        end = len(text) if nl < 0 else nl + 1
        line = text[pos:end]
        yield end, line, line.rstrip("\r\n")
        pos = end


def _block_scalar(text: str, pos: int, parent: int, out: list[str]) -> int:
    """The content lines of a block scalar from ``pos`` replaced, their indentation kept:
    every line, blank or deeper than the key, down to the depth of the first (a shallower
    one ends it in YAML); where it ends."""
    depth: int | None = None
    for end, line, body in _lines(text, pos):
        n = _indent(body)
        if n < len(body):  # not blank
            if n <= parent or (depth is not None and n < depth):
                break
            depth = n if depth is None else depth
            line = body[:n] + REDACTED + line[len(body) :]
        out.append(line)
        pos = end
    return pos


def _mapping_line(text: str) -> str:
    """A line of a list's item that is a mapping (``- name: x``, ``value: s3cret`` below
    it), from its indentation on: its value replaced unless its key names the item."""
    m = _ITEM_LINE.match(text)
    if m is None:
        return text
    rest = m.group("rest")
    if not rest or rest[0] == "#" or (m.group("name") or "").lower() in _ITEM_NAME_KEYS:
        return text
    if rest[0] == "{":
        rest = _MAPPING_PARTS.sub(lambda q: _mapping_part(q, ""), rest)
    elif rest[0] == "[":
        rest = _sequence(rest, "")
    else:
        rest = REDACTED
    return text[: m.start("rest")] + rest


def _block_sequence(text: str, pos: int, parent: int, out: list[str]) -> int:
    """The scalar items of a block sequence from ``pos`` replaced (``- [REDACTED]``), the
    lines that continue them too; in an item that is a mapping (``- name: x``), every value
    but those of the keys that name it (see _ITEM_NAME_KEYS). Its items are as deep as the
    first, no shallower than the key (YAML allows them at its column); where it ends."""
    depth: int | None = None
    scalar = False
    for end, line, body in _lines(text, pos):
        n = _indent(body)
        if n < len(body):  # not blank
            depth = n if depth is None else depth
            if n < depth or depth < parent:
                break
            if n == depth:
                item = body[n + 1 :].lstrip(" \t")
                if body[n] != "-" or item == body[n + 1 :] != "":
                    break  # the next key, or a word that starts with "-"
                scalar = not _MAPPING_ITEM.match(item) and item[:1] != "{"
                if scalar and item:
                    line = body[: len(body) - len(item)] + REDACTED + line[len(body) :]
            elif scalar:
                line = body[:n] + REDACTED + line[len(body) :]
            if not scalar:
                line = body[:n] + _mapping_line(body[n:]) + line[len(body) :]
        out.append(line)
        pos = end
    return pos


def _block_values(text: str) -> str:
    """``text`` with the value of each block scalar or block sequence under a key naming a
    secret replaced."""
    out: list[str] = []
    pos = 0
    for m in _BLOCK_INDICATOR.finditer(text):
        if m.start() < pos:
            continue  # a key inside a block already replaced
        line = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
        key = _BLOCK_KEY.search(line)
        if key is None or not _SENSITIVE_WORD.search(key.group("key")):
            continue
        lead = line[: key.start()]
        # The key's column in YAML; after a log prefix, the line's own indentation.
        parent = len(lead) if _YAML_LEAD.fullmatch(lead) else _indent(lead)
        out.append(text[pos : m.end()])
        block = _block_scalar if m.group("seq") is None else _block_sequence
        pos = block(text, m.end(), parent, out)
    out.append(text[pos:])
    return "".join(out)


def _openssl_pass(m: re.Match[str]) -> str:
    value = m.group(0)[len(m.group("q") or "") + len("pass:") :]
    quote = value[0] if m.group("q") is None and value[0] in ("'", '"') else ""
    return f"{m.group('q') or ''}pass:{quote}{REDACTED}{quote}"


def _openssl_keys(m: re.Match[str]) -> str:
    def key(k: re.Match[str]) -> str:
        return f"{k.group('flag')}{k.group('sep') or k.group('item')}{REDACTED}"

    args = _OPENSSL_KEY.sub(key, m.group("args"))
    return m.group(0)[: m.start("args") - m.start()] + args


def _flag(m: re.Match[str]) -> str:
    if m.group("key").lstrip("-").lower() == "pass" and _OPENSSL_SOURCE.match(m.group("value")):
        return m.group(0)  # openssl's -pass env:VAR names where it is; pass:X is redacted
    return f"{m.group('key')}{m.group('sep')}{REDACTED}"


def _connection_password(m: re.Match[str]) -> str:
    text, i = m.string, m.start() - 1
    while i >= 0 and text[i] in " \t":
        i -= 1
    if not (i >= 0 and text[i] == ";") and text[m.end() : m.end() + 1] != ";":
        return m.group(0)  # no connection string: key=value's rule decides
    return f"{m.group('key')}={REDACTED}"


def _mysql_passwords(m: re.Match[str]) -> str:
    args = _MYSQL_PASSWORD.sub(f"-p{REDACTED}", m.group("args"))
    return m.group(0)[: m.start("args") - m.start()] + args


def _redis_cli_passwords(m: re.Match[str]) -> str:
    def password(p: re.Match[str]) -> str:
        return f"{p.group('flag')}{p.group('sep') or p.group('item')}{REDACTED}"

    args = _REDIS_CLI_PASSWORD.sub(password, m.group("args"))
    args = _REDIS_CLI_AUTH.sub(_auth_password, args)
    return m.group(0)[: m.start("args") - m.start()] + args


def _redis_directive(m: re.Match[str]) -> str:
    text, start = m.string, m.start()
    before = text[start - 1 : start]
    if (before.isalnum() or before in ("_", "-")) and text[start - 2 : start] != "\\n":
        return m.group(0)  # part of a longer name, or a --flag (see _FLAG)
    if m.group("ksep") is not None:
        return f"{m.group('key')}{m.group('q')}{m.group('ksep')}{REDACTED}"
    escaped_nl = text.rfind("\\n", 0, start)
    line = text[
        max(text.rfind("\n", 0, start) + 1, escaped_nl + 2 if escaped_nl >= 0 else 0) : start
    ]
    alone = (
        not m.group("q")
        and (line.strip(" \t") == "" or line.rstrip(" \t")[-1:] in ("'", '"'))
        and _DIRECTIVE_END.match(text, m.end()) is not None
    )
    if not alone and not _CONFIG_SET.search(line):
        return m.group(0)  # prose: "requirepass is not set"
    value = m.group("value")
    quote = value[0] if value[0] in ("'", '"') else ""
    return f"{text[start : m.start('value')]}{quote}{REDACTED}{quote}"


def _auth_password(m: re.Match[str]) -> str:
    """AUTH's arguments with the password, the last of them, replaced."""
    last = "first" if m.group("second") is None else "second"
    value = m.group(last)
    quote = value[0] if value[0] in ("'", '"') else ""
    start, end = m.start(last) - m.start(), m.end(last) - m.start()
    return f"{m.group(0)[:start]}{quote}{REDACTED}{quote}{m.group(0)[end:]}"


def _redis_auth(m: re.Match[str]) -> str:
    if not m.group("cmd").rstrip().endswith('"'):
        text = m.string
        line = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
        if not _REDIS_PROMPT.search(line):
            return m.group(0)  # a > before a word, no redis-cli prompt
    return _auth_password(m)


def _acl_passwords(m: re.Match[str]) -> str:
    def password(p: re.Match[str]) -> str:
        # A selector's ")" after a bare password closes the selector: kept, as its "(" is.
        before = p.string[: p.start()]
        inside = before.count("(") + bool(p.group("sel")) > before.count(")")
        close = ")" if inside and not p.group("q") and p.group(0)[-1] == ")" else ""
        sign = p.group("op") or p.group("hop")
        return f"{p.group('q') or ''}{p.group('sel') or ''}{sign}{REDACTED}{close}"

    args = _ACL_PASSWORD.sub(password, m.group("args"))
    whole, start = m.group(0), m.start()
    return whole[: m.start("args") - start] + args + whole[m.end("args") - start :]


def _getuser_passwords(m: re.Match[str]) -> str:
    items = _HEX64.sub(REDACTED, m.group("items"))
    return m.group(0)[: m.start("items") - m.start()] + items


def redact(text: str) -> str:
    """``text`` with every recognised secret replaced by ``[REDACTED]``."""
    if not text:
        return text
    text = _PEM.sub(REDACTED, text)
    # Before the headers' and key=value's: they would take "|" for the value.
    text = _block_values(text)
    text = _AUTH_HEADER.sub(_header, text)
    text = _SCHEME_CREDENTIAL.sub(_scheme_credential, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    text = _TOKENS.sub(REDACTED, text)
    if "pass:" in text:
        text = _OPENSSL_PASS.sub(_openssl_pass, text)
    if "openssl" in text:
        text = _OPENSSL_COMMAND.sub(_openssl_keys, text)
    text = _FLAG.sub(_flag, text)
    if "mysql" in text or "mariadb" in text:
        text = _MYSQL_COMMAND.sub(_mysql_passwords, text)
    if "redis-cli" in text:
        text = _REDIS_CLI_COMMAND.sub(_redis_cli_passwords, text)
    if "passwords" in text:  # before key=value's, which takes RESP3's => for a separator
        text = _REDIS_GETUSER_PASSWORDS.sub(_getuser_passwords, text)
    text = _NAMED_VALUE.sub(_key_value, text)
    text = _CONNECTION_PASSWORD.sub(_connection_password, text)
    text = _key_values(text)
    # After the rules above: a value of theirs holding the word is theirs, whole.
    lowered = text.lower()
    if "requirepass" in lowered or "masterauth" in lowered:
        text = _REDIS_DIRECTIVE.sub(_redis_directive, text)
        text = _REDIS_CONFIG_GET.sub(lambda m: f'{m.group("key")}"{REDACTED}"', text)
    if "auth" in lowered:
        text = _REDIS_AUTH.sub(_redis_auth, text)
    if "setuser" in lowered:
        text = _REDIS_ACL_SETUSER.sub(_acl_passwords, text)
    if "user " in text:
        text = _REDIS_ACL_USER.sub(_acl_passwords, text)
    return _LONG_OPAQUE.sub(_opaque, text)


def clip(text: str, max_bytes: int, *, keep: Literal["head", "tail"] = "head") -> str:
    """At most ``max_bytes`` of UTF-8, keeping the head or the tail, whole characters only."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    if max_bytes <= 0:
        return ""
    part = raw[-max_bytes:] if keep == "tail" else raw[:max_bytes]
    return part.decode("utf-8", errors="ignore")
