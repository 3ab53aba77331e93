"""Custom-resource admission as kube-apiserver 1.32 does it, without a server: defaulting, pruning,
OpenAPI v3 schema validation (via `jsonschema`) and `x-kubernetes-validations` CEL rules (via `celpy`).

Pure functions on plain dicts, so tests can check manifests directly:

    errors = validate(crd, obj)  # ["spec.numNodes: Invalid value: 0: spec.numNodes in body should be ..."]
    obj = apply_defaults(crd, obj)

Error strings follow the apiserver's `field.Error` wording, so a message a test expects here is the message
`kubectl apply` prints against a real cluster.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import celpy
import celpy.evaluation
import jsonschema
from celpy import celtypes

# Keys a structural schema may carry that jsonschema (Draft 4, the OpenAPI v3 dialect) understands as is.
_PLAIN_KEYWORDS = (
    "required",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "multipleOf",
    "minProperties",
    "maxProperties",
)
# Fields every object keeps whatever its schema says (the apiserver handles them outside the schema).
_OBJECT_META_KEYS = ("apiVersion", "kind", "metadata")


# ---------------------------------------------------------------------------------------------------
# Looking up the schema


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def crd_version(crd: dict, version: str | None = None) -> dict:
    """The CRD's entry in `spec.versions` for `version`, or its storage version when None."""
    versions = crd["spec"]["versions"]
    for entry in versions:
        if (version is None and entry.get("storage")) or entry["name"] == version:
            return entry
    if version is None and versions:
        return versions[0]
    raise KeyError(f"CRD {crd['metadata']['name']} has no version {version!r}")


def _version_of(crd: dict, obj: dict, version: str | None) -> str | None:
    if version is not None:
        return version
    api_version = obj.get("apiVersion", "")
    name = api_version.rsplit("/", 1)[-1]
    return name if any(v["name"] == name for v in crd["spec"]["versions"]) else None


def schema_of(crd: dict, version: str | None = None) -> dict:
    """The `openAPIV3Schema` of one CRD version ({} when the CRD declares none)."""
    return crd_version(crd, version).get("schema", {}).get("openAPIV3Schema", {})


def qualified_kind(crd: dict) -> str:
    """`Kind.group`, the way the apiserver names a resource type in error messages."""
    return f"{crd['spec']['names']['kind']}.{crd['spec']['group']}"


# ---------------------------------------------------------------------------------------------------
# Defaulting and pruning


def apply_defaults(crd: dict, obj: dict, version: str | None = None) -> dict:
    """A copy of `obj` with every schema `default` filled in where the field is absent (or null and not
    nullable), at any depth under an existing parent, like the apiserver's structural defaulting."""
    result = copy.deepcopy(obj)
    _default(schema_of(crd, _version_of(crd, obj, version)), result)
    return result


def _default(schema: dict, value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if "default" in sub and (key not in value or (value[key] is None and not sub.get("nullable"))):
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in schema.get("properties", {}):
                    _default(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def prune(crd: dict, obj: dict, version: str | None = None) -> dict:
    """A copy of `obj` without the fields its schema does not declare (unless the schema preserves
    unknown fields there), like the apiserver's pruning of structural schemas."""
    result = copy.deepcopy(obj)
    _prune(schema_of(crd, _version_of(crd, obj, version)), result, "", [], keep_meta=True)
    return result


def unknown_fields(crd: dict, obj: dict, version: str | None = None) -> list[str]:
    """Paths of the fields pruning would drop (`spec.junk`): what `fieldValidation=Strict` rejects."""
    removed: list[str] = []
    _prune(schema_of(crd, _version_of(crd, obj, version)), copy.deepcopy(obj), "", removed, keep_meta=True)
    return removed


def _prune(schema: dict, value: Any, path: str, removed: list[str], keep_meta: bool = False) -> None:
    if schema.get("x-kubernetes-int-or-string"):
        return
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        keep_meta = keep_meta or schema.get("x-kubernetes-embedded-resource", False)
        for key in list(value):
            if keep_meta and key in _OBJECT_META_KEYS:
                continue  # ObjectMeta is the apiserver's own, never pruned by the CRD's schema
            if key in properties:
                _prune(properties[key], value[key], _child(path, key), removed)
            elif isinstance(extra, dict):
                _prune(extra, value[key], _child(path, key), removed)
            elif not (preserve or extra is True):
                del value[key]
                removed.append(_child(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _prune(schema["items"], item, f"{path}[{index}]", removed)


# ---------------------------------------------------------------------------------------------------
# Schema validation


def _to_jsonschema(schema: dict, root: bool = False) -> dict:
    """Translate a structural schema's Kubernetes extensions into plain Draft-4 keywords."""
    out: dict[str, Any] = {key: schema[key] for key in _PLAIN_KEYWORDS if key in schema}
    types: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        types = ["integer", "string"]
    elif "type" in schema:
        types = [schema["type"]]
    if types and schema.get("nullable"):
        types.append("null")
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if types:
        out["type"] = types if len(types) > 1 else types[0]
    properties = dict(schema.get("properties", {}))
    if root and "metadata" in properties:
        # The apiserver validates ObjectMeta itself; a root schema may only restrict name and generateName.
        meta = properties.pop("metadata").get("properties", {})
        kept = {key: meta[key] for key in ("name", "generateName") if key in meta}
        if kept:
            properties["metadata"] = {"type": "object", "properties": kept}
    if properties:
        out["properties"] = {key: _to_jsonschema(sub) for key, sub in properties.items()}
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _to_jsonschema(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = _to_jsonschema(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [_to_jsonschema(sub) for sub in schema[key]]
    if "not" in schema:
        out["not"] = _to_jsonschema(schema["not"])
    if schema.get("x-kubernetes-embedded-resource"):
        out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def _number(value: float | int) -> str:
    """Go's `%v` of a number: integral floats print without a fraction."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def render_value(value: Any) -> str:
    """A value the way `field.Error` prints it: strings quoted, numbers and booleans bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _schema_messages(error: jsonschema.ValidationError) -> Iterator[str]:
    path = _path(error.absolute_path)
    keyword, limit, value = error.validator, error.validator_value, error.instance
    where = f"{path} in body"
    if keyword == "required":
        for key in limit:
            if isinstance(value, dict) and key not in value:
                yield f"{_child(path, key)}: Required value"
        return
    if keyword == "type":
        wanted = ",".join(t for t in ([limit] if isinstance(limit, str) else limit) if t != "null")
        actual = _json_type(value)
        yield f'{path}: Invalid value: "{actual}": {where} must be of type {wanted}: "{actual}"'
        return
    if keyword == "enum":
        supported = ", ".join(render_value(v) for v in limit if v is not None)
        yield f"{path}: Unsupported value: {render_value(value)}: supported values: {supported}"
        return
    if keyword == "maxLength":
        yield f"{path}: Too long: may not be more than {limit} bytes"
        return
    if keyword in ("maxItems", "maxProperties"):
        noun = "items" if keyword == "maxItems" else "properties"
        yield f"{path}: Too many: {len(value)}: must have at most {limit} {noun}"
        return
    schema = error.schema if isinstance(error.schema, dict) else {}
    details = {
        "minimum": f"should be greater than{'' if schema.get('exclusiveMinimum') else ' or equal to'} "
        f"{_number(limit)}",
        "maximum": f"should be less than{'' if schema.get('exclusiveMaximum') else ' or equal to'} "
        f"{_number(limit)}",
        "minLength": f"should be at least {limit} chars long",
        "pattern": f"should match '{limit}'",
        "minItems": f"should have at least {limit} items",
        "uniqueItems": "shouldn't contain duplicates",
        "multipleOf": f"should be a multiple of {_number(limit) if not isinstance(limit, bool) else limit}",
        "minProperties": f"should have at least {limit} properties",
    }
    detail = details.get(keyword, error.message)
    yield f"{path}: Invalid value: {render_value(value)}: {where} {detail}"


@lru_cache(maxsize=64)
def _validator(schema_json: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(_to_jsonschema(json.loads(schema_json), root=True))


def schema_errors(schema: dict, obj: dict) -> list[str]:
    """Messages for every OpenAPI violation of `obj` against one version's `openAPIV3Schema`."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    messages: list[str] = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        for message in _schema_messages(error):
            if message not in messages:
                messages.append(message)
    return messages


# ---------------------------------------------------------------------------------------------------
# CEL rules (x-kubernetes-validations)

_CEL = celpy.Environment()


def _numeric(name: str) -> Any:
    """Kubernetes' CEL compares ints with doubles (`self.lr > 0` where lr is a `number`); celpy refuses
    mixed operands, so mixed pairs are compared as doubles."""
    base = celpy.evaluation.base_functions[name]

    def compare(left: Any, right: Any) -> Any:
        ints = (celtypes.IntType, celtypes.UintType)
        if (isinstance(left, ints) and isinstance(right, celtypes.DoubleType)) or (
            isinstance(left, celtypes.DoubleType) and isinstance(right, ints)
        ):
            left, right = celtypes.DoubleType(left), celtypes.DoubleType(right)
        return base(left, right)

    return compare


_COMPARISONS = {name: _numeric(name) for name in ("_<_", "_<=_", "_>_", "_>=_", "_==_", "_!=_")}


@lru_cache(maxsize=512)
def _program(expression: str) -> celpy.Runner:
    return _CEL.program(_CEL.compile(expression), functions=_COMPARISONS)


def to_cel(schema: dict, value: Any) -> Any:
    """`value` as a CEL value typed by its schema (a `number` holding 2 is a double, as in Kubernetes)."""
    kind = schema.get("type")
    if value is None:
        return None
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    if kind == "integer" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.IntType(int(value))
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    if isinstance(value, dict) and (
        schema.get("properties") or isinstance(schema.get("additionalProperties"), dict)
    ):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(key): to_cel(
                    properties.get(key, extra if isinstance(extra, dict) else {}), item
                )
                for key, item in value.items()
            }
        )
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return celtypes.ListType([to_cel(schema["items"], item) for item in value])
    return celpy.json_to_cel(value)


_FIELD_PATH_PART = re.compile(r"\.([A-Za-z_$][\w$-]*)|\['([^']*)'\]|\[(\d+)\]")


def _join_field_path(path: str, field_path: str) -> str:
    """Append a rule's relative `fieldPath` (`.a.b`, `.a['b-c']`, `.a[0]`) to the node's path."""
    for name, quoted, index in _FIELD_PATH_PART.findall(field_path):
        if index:
            path += f"[{index}]"
        else:
            path = _child(path, name or quoted)
    return path


def _rule_error(path: str, schema: dict, rule: dict, message: str) -> str:
    reason = rule.get("reason", "FieldValueInvalid")
    path = _join_field_path(path, rule.get("fieldPath", "")) or "<nil>"  # how the apiserver names the root
    if reason == "FieldValueRequired":
        return f"{path}: Required value: {message}"
    if reason == "FieldValueForbidden":
        return f"{path}: Forbidden: {message}"
    if reason == "FieldValueDuplicate":
        return f'{path}: Duplicate value: "{schema.get("type", "object")}": {message}'
    return f'{path}: Invalid value: "{schema.get("type", "object")}": {message}'


def _check_rules(schema: dict, value: Any, old: Any, path: str) -> list[str]:
    messages: list[str] = []
    rules = schema.get("x-kubernetes-validations", [])
    if rules and value is not None:
        activation: dict[str, Any] = {"self": to_cel(schema, value)}
        if old is not None:
            activation["oldSelf"] = to_cel(schema, old)
        for rule in rules:
            expression = rule["rule"]
            if "oldSelf" in expression and old is None:
                continue  # transition rules only run on updates, where an old value exists
            try:
                ok = _program(expression).evaluate(activation)
            except Exception as error:  # compile or evaluation error: the apiserver reports the rule
                messages.append(_rule_error(path, schema, rule, f"rule evaluation error: {error}"))
                continue
            if isinstance(ok, celtypes.BoolType) and bool(ok):
                continue
            message = rule.get("message") or f"failed rule: {expression}"
            if rule.get("messageExpression"):
                # The apiserver falls back to `message` when messageExpression fails.
                with contextlib.suppress(Exception):
                    message = str(_program(rule["messageExpression"]).evaluate(activation))
            messages.append(_rule_error(path, schema, rule, message))
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                old_item = old.get(key) if isinstance(old, dict) else None
                messages += _check_rules(sub, item, old_item, _child(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        # Transition rules in lists need list-type map keys to pair items; pair by index only when the
        # length is unchanged, which covers the common "immutable field" rules.
        same = isinstance(old, list) and len(old) == len(value)
        for index, item in enumerate(value):
            old_item = old[index] if same else None
            messages += _check_rules(schema["items"], item, old_item, f"{path}[{index}]")
    return messages


def cel_errors(schema: dict, obj: dict, old: dict | None = None) -> list[str]:
    """Messages for every failed `x-kubernetes-validations` rule; `old` enables transition rules."""
    visible = dict(obj)
    if "metadata" in visible:  # CEL sees only metadata.name and generateName
        meta = visible["metadata"] or {}
        visible["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
    return _check_rules(schema, visible, old, "")


# ---------------------------------------------------------------------------------------------------
# The public entry points


_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"


def name_errors(metadata: dict) -> list[str]:
    """`metadata.name` checks every custom resource gets: present, a DNS-1123 subdomain of at most 253."""
    name = metadata.get("name")
    if not name:
        if metadata.get("generateName"):
            return []
        return ["metadata.name: Required value: name or generateName is required"]
    if len(name) > 253:
        return [f"metadata.name: Invalid value: {render_value(name)}: must be no more than 253 characters"]
    if not re.fullmatch(_SUBDOMAIN, name):
        return [
            f"metadata.name: Invalid value: {render_value(name)}: a lowercase RFC 1123 subdomain must "
            "consist of lower case alphanumeric characters, '-' or '.', and must start and end with an "
            f"alphanumeric character (e.g. 'example.com', regex used for validation is '{_SUBDOMAIN}')"
        ]
    return []


def validate(crd: dict, obj: dict, version: str | None = None, old: dict | None = None) -> list[str]:
    """Every error the apiserver would report for `obj` as given (no defaulting or pruning first; call
    `admit` for the whole admission chain). Empty when valid. A failed rule on the root object is named
    `<nil>`, as the apiserver names it, unless the rule gives a `fieldPath`."""
    schema = schema_of(crd, _version_of(crd, obj, version))
    messages = name_errors(obj.get("metadata") or {}) + schema_errors(schema, obj)
    return messages + cel_errors(schema, obj, old)


def admit(
    crd: dict, obj: dict, version: str | None = None, old: dict | None = None
) -> tuple[dict, list[str]]:
    """The apiserver's chain for a create or update: default, prune, then validate.
    Returns the object as it would be stored and the error messages (empty when accepted)."""
    version = _version_of(crd, obj, version)
    stored = prune(crd, apply_defaults(crd, obj, version), version)
    return stored, validate(crd, stored, version, old)


def invalid_message(crd: dict, name: str, messages: list[str]) -> str:
    """The Status message of a 422 answer: `Kind.group "name" is invalid: <error>` or `[e1, e2]`."""
    body = messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"
    return f'{qualified_kind(crd)} "{name}" is invalid: {body}'
