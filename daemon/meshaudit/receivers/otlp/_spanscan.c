/*
 * meshaudit.receivers.otlp._spanscan: what decode_traces reads of every span of an OTLP
 * ExportTraceServiceRequest, taken from its wire bytes in one pass.
 *
 * Why: reading a span through protobuf's Python objects costs ~5.5 us: about twenty attribute
 * look-ups in upb's map (each 0.25-0.5 us: a wrapper of the AnyValue, then its string_value),
 * the ids' hex, the times. This scan walks the bytes instead and returns one tuple per span, the
 * attributes' "first non-empty of these keys" already chosen. It runs only on an export that
 * protobuf (upb) has parsed without error into the map view (proto/meshaudit/otlpview/v1), so it
 * never decides what is valid: upb does. Still, every read is bounds-checked and anything
 * unexpected (a group, a malformed varint, a string that is not UTF-8) ends the scan with
 * ValueError; the caller then reads the spans through protobuf (decode.read_spans), the reference
 * this scan must equal (tests/unit/test_otlp_scan.py compares the two on generated, merged,
 * mutated and SDK-made exports).
 *
 * Protobuf's merge rules, as upb applies them to the view, are kept: a scalar or bytes field that
 * appears more than once takes its last value; a submessage that appears more than once is
 * merged (a resource's attribute entries concatenate); a field whose wire type is not its
 * declared one is an unknown field, skipped; a map's later entry of a key replaces the earlier one
 * whole, and within one entry the last key counts and the value's occurrences merge, but an entry
 * holding a field besides those is left out of the map (upb keeps it as an unknown field); AnyValue's
 * oneof takes its last member, an array_value following an array_value appends to it, and
 * kvlist_value and bytes_value are unknown fields in the view (they leave the oneof as it was).
 *
 * spans(data: bytes) -> list[tuple] | None. None when a span's trace id is not 16 bytes, its span
 * id not 8, or its parent span id neither empty nor 8: the caller reads the export through
 * protobuf, which refuses it naming the span. Else one tuple per ResourceSpans, in order:
 * (service.name, service.namespace, k8s.namespace.name, spans), the three as decode._attr reads
 * them (a str, int, bool or float; None when absent, empty or "-"), spans a list with one tuple
 * per span of its scope_spans, in order:
 *   (trace_id: str (hex), span_id: str (hex), parent_span_id: str | None (hex; None when empty),
 *    kind: int, start: float (start_time_unix_nano / 1e9), duration_ms: float | None ((end - start)
 *    / 1e6, None unless end > start), node_id, request_id (guid:x-request-id, else the first value
 *    of http.request.header.x-request-id, an array or a string), path (from http.url, else url.path,
 *    url.full, http.target), upstream_cluster: str (upstream_cluster, else upstream_cluster.name,
 *    else ""), istio.canonical_service, istio.namespace, server.address, peer address (peer.address,
 *    client.address, network.peer.address, net.peer.ip), method (http.method, http.request.method),
 *    status, user_agent.original)
 * where each named string is decode._sv's (a string value neither empty nor "-", else None) and
 * status is the first of http.status_code, http.response.status_code that decode._attr does not
 * read as None: an int for an int, a bool or a string of at most 18 ASCII digits (0 when neither
 * key has one), the value itself otherwise (a float, another string), for decode._int.
 *
 * Field numbers: proto/meshaudit/otlpview/v1/view.proto (opentelemetry-proto's, fewer fields).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../protowire.h"

/* What a function returns when an id has the wrong size: the whole export goes to protobuf. */
enum { BAD_ID = -2 };

/* Each scanning function starts its Field zeroed: with next_field inlined, gcc cannot tell that
 * a value read (only for the wire type that sets it) is always set, and warns. */
static const Slice EMPTY = {(const uint8_t *)"", 0};

/* The attribute keys read, in decode._span_hop's order of preference within each group. */
typedef struct {
    const char *s;
    size_t n;
} Key;
#define KEY(s) {s, sizeof(s) - 1}

enum {
    K_NODE_ID, K_GUID_RID, K_HEADER_RID, K_HTTP_URL, K_URL_PATH, K_URL_FULL, K_HTTP_TARGET,
    K_CLUSTER, K_CLUSTER_NAME, K_CANONICAL_SERVICE, K_ISTIO_NAMESPACE, K_SERVER_ADDRESS,
    K_PEER_ADDRESS, K_CLIENT_ADDRESS, K_NETWORK_PEER_ADDRESS, K_NET_PEER_IP, K_HTTP_METHOD,
    K_REQUEST_METHOD, K_STATUS_CODE, K_RESPONSE_STATUS_CODE, K_USER_AGENT, SPAN_KEYS
};
static const Key SPAN_KEY[SPAN_KEYS] = {
    KEY("node_id"), KEY("guid:x-request-id"), KEY("http.request.header.x-request-id"), KEY("http.url"),
    KEY("url.path"), KEY("url.full"), KEY("http.target"), KEY("upstream_cluster"), KEY("upstream_cluster.name"),
    KEY("istio.canonical_service"), KEY("istio.namespace"), KEY("server.address"), KEY("peer.address"),
    KEY("client.address"), KEY("network.peer.address"), KEY("net.peer.ip"), KEY("http.method"),
    KEY("http.request.method"), KEY("http.status_code"), KEY("http.response.status_code"),
    KEY("user_agent.original"),
};

enum { R_SERVICE, R_NAMESPACE, R_K8S_NAMESPACE, RESOURCE_KEYS };
static const Key RESOURCE_KEY[RESOURCE_KEYS] = {
    KEY("service.name"), KEY("service.namespace"), KEY("k8s.namespace.name"),
};

/* An attributes map entry (KeyValue: string key = 1; AnyValue value = 2): when its key (the last
 * one in it) is one of keys, the entry is the one that counts for that key, a later one replacing
 * it. at[i].p NULL: key i not seen. An entry holding any other field (or its key or value in
 * another wire type) is not one: upb keeps it whole as an unknown field of the span or resource,
 * out of the map, and an earlier entry of its key stays. */
static int record_entry(Slice entry, const Key *keys, int nkeys, Slice *at)
{
    Field f = {0};
    int rc;
    Slice key = EMPTY;
    FOR_FIELDS(entry, f, rc)
    {
        if (f.wt != WT_LEN || (f.num != 1 && f.num != 2))
            return 0;
        if (f.num == 1)
            key = f.s;
    }
    if (rc < 0)
        return -1;
    for (int i = 0; i < nkeys; i++) {
        if (keys[i].n == key.n && memcmp(keys[i].s, key.p, key.n) == 0) {
            at[i] = entry;
            break;
        }
    }
    return 0;
}

/* An AnyValue as upb holds it once parsed: oneof value { string string_value = 1; bool
 * bool_value = 2; int64 int_value = 3; double double_value = 4; ArrayValue array_value = 5; }
 * (which: the member's field number, 0 none) and, for an array, its first element's encoding. */
typedef struct {
    int which;
    Slice str;
    uint64_t v; /* bool, int64 (two's complement), double (its bits) */
    int have_first;
    Slice first;
} Any;

/* ArrayValue: repeated AnyValue values = 1; only the first element is read. */
static int merge_array(Slice s, Any *a)
{
    Field f = {0};
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == 1 && f.wt == WT_LEN && !a->have_first) {
            a->have_first = 1;
            a->first = f.s;
        }
    }
    return rc;
}

static int merge_any(Slice s, Any *a)
{
    Field f = {0};
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        switch (f.num) {
        case 1:
            if (f.wt == WT_LEN) {
                a->which = 1;
                a->str = f.s;
            }
            break;
        case 2:
        case 3:
            if (f.wt == WT_VARINT) {
                a->which = (int)f.num;
                a->v = f.v;
            }
            break;
        case 4:
            if (f.wt == WT_I64) {
                a->which = 4;
                a->v = f.v;
            }
            break;
        case 5:
            if (f.wt != WT_LEN)
                break;
            if (a->which != 5) { /* a new array: the member before is cleared */
                a->which = 5;
                a->have_first = 0;
            }
            if (merge_array(f.s, a) < 0)
                return -1;
            break;
        default:
            break;
        }
    }
    return rc;
}

/* The value of a map entry: its value field's occurrences merged; which 0 when there is none. */
static int entry_value(Slice entry, Any *a)
{
    Field f = {0};
    int rc;
    memset(a, 0, sizeof(*a));
    if (entry.p == NULL)
        return 0;
    FOR_FIELDS(entry, f, rc)
    {
        if (f.num == 2 && f.wt == WT_LEN && merge_any(f.s, a) < 0)
            return -1;
    }
    return rc;
}

static int is_dash(Slice s)
{
    return s.n == 1 && s.p[0] == '-';
}

/* decode._sv: a string value neither empty nor "-". */
static int sv(const Any *a, Slice *out)
{
    if (a->which != 1 || a->str.n == 0 || is_dash(a->str))
        return 0;
    *out = a->str;
    return 1;
}

/* decode._attr's None: no value, an array, an empty string or "-". */
static int attr_none(const Any *a)
{
    return a->which == 0 || a->which == 5 || (a->which == 1 && (a->str.n == 0 || is_dash(a->str)));
}

/* What one span's scan keeps: slices into the export, the scalars, each key's value. */
typedef struct {
    Slice trace_id, span_id, parent;
    uint32_t kind;
    uint64_t start, end;
    Slice entry[SPAN_KEYS];
    Any value[SPAN_KEYS];
} Span;

/* Span: trace_id = 1, span_id = 2, parent_span_id = 4, kind = 6, start_time_unix_nano = 7,
 * end_time_unix_nano = 8, attributes = 9; then each key's value, the request-id header's being its
 * first element when it is an array (decode._header). */
static int scan_span(Slice s, Span *sp)
{
    Field f = {0};
    int rc;
    memset(sp, 0, sizeof(*sp));
    sp->trace_id = sp->span_id = sp->parent = EMPTY;
    FOR_FIELDS(s, f, rc)
    {
        switch (f.num) {
        case 1:
        case 2:
        case 4:
            if (f.wt == WT_LEN)
                *(f.num == 1 ? &sp->trace_id : f.num == 2 ? &sp->span_id : &sp->parent) = f.s;
            break;
        case 6:
            if (f.wt == WT_VARINT)
                sp->kind = (uint32_t)f.v; /* an int32: upb keeps the low 32 bits */
            break;
        case 7:
        case 8:
            if (f.wt == WT_I64)
                *(f.num == 7 ? &sp->start : &sp->end) = f.v;
            break;
        case 9:
            if (f.wt == WT_LEN && record_entry(f.s, SPAN_KEY, SPAN_KEYS, sp->entry) < 0)
                return -1;
            break;
        default:
            break;
        }
    }
    if (rc < 0)
        return -1;
    if (sp->trace_id.n != 16 || sp->span_id.n != 8 || (sp->parent.n != 0 && sp->parent.n != 8))
        return BAD_ID;
    for (int i = 0; i < SPAN_KEYS; i++) {
        if (entry_value(sp->entry[i], &sp->value[i]) < 0)
            return -1;
    }
    Any *h = &sp->value[K_HEADER_RID];
    if (h->which == 5) {
        Any first;
        memset(&first, 0, sizeof(first));
        if (h->have_first && merge_any(h->first, &first) < 0)
            return -1;
        *h = first; /* none when the array is empty */
    }
    return 0;
}

static PyObject *str_of(Slice s)
{
    return PyUnicode_DecodeUTF8((const char *)s.p, (Py_ssize_t)s.n, "strict");
}

/* The last string made of a value that repeats from span to span of one export (one proxy, few
 * clusters, methods and clients): equal bytes give the same object again, whose hash Python has
 * computed already when decode looks it up. */
typedef struct {
    Slice bytes;
    PyObject *str;
} Recent;

enum { R_NODE, R_CLUSTER, R_METHOD, R_CANONICAL, R_ISTIO_NS, R_AGENT, RECENT };

static PyObject *recent_str(Recent *r, Slice s)
{
    if (r->str != NULL && r->bytes.n == s.n && memcmp(r->bytes.p, s.p, s.n) == 0)
        return Py_NewRef(r->str);
    PyObject *u = str_of(s);
    if (u != NULL) {
        Py_XSETREF(r->str, Py_NewRef(u));
        r->bytes = s;
    }
    return u;
}

/* The _sv of the first of keys[0..n) that has one, as a string (recent: through that cache);
 * None when none has. */
static PyObject *first_sv(Span *sp, const int *keys, int n, Recent *recent)
{
    Slice s;
    for (int i = 0; i < n; i++) {
        if (sv(&sp->value[keys[i]], &s))
            return recent != NULL ? recent_str(recent, s) : str_of(s);
    }
    Py_RETURN_NONE;
}

static PyObject *key_sv(Span *sp, int key, Recent *recent)
{
    return first_sv(sp, &key, 1, recent);
}

/* decode._path_of: the path of a URL ("scheme://host/path" -> "/path", "/" when it has none), or
 * the value itself when it is not one. Bytes and characters agree on where "://" and "/" are:
 * UTF-8 never uses ASCII bytes inside a multi-byte character. */
static PyObject *path_of(Slice url)
{
    for (size_t i = 0; i + 3 <= url.n; i++) {
        if (memcmp(url.p + i, "://", 3) != 0)
            continue;
        const uint8_t *slash = memchr(url.p + i + 3, '/', url.n - i - 3);
        if (slash == NULL)
            return PyUnicode_FromStringAndSize("/", 1);
        Slice rest = {slash, url.n - (size_t)(slash - url.p)};
        return str_of(rest);
    }
    return str_of(url);
}

/* decode._span_hop's path: http.url's path when set, else url.path, url.full's path, http.target. */
static PyObject *span_path(Span *sp)
{
    Slice s;
    if (sv(&sp->value[K_HTTP_URL], &s))
        return path_of(s);
    if (sv(&sp->value[K_URL_PATH], &s))
        return str_of(s);
    if (sv(&sp->value[K_URL_FULL], &s))
        return path_of(s);
    return key_sv(sp, K_HTTP_TARGET, NULL);
}

/* decode._attr's value: a str, bool, int or float; None as attr_none says. */
static PyObject *attr_obj(const Any *a)
{
    double d;
    if (attr_none(a))
        Py_RETURN_NONE;
    switch (a->which) {
    case 1:
        return str_of(a->str);
    case 2:
        return PyBool_FromLong(a->v != 0);
    case 3:
        return PyLong_FromLongLong((long long)a->v);
    default:
        memcpy(&d, &a->v, sizeof(d));
        return PyFloat_FromDouble(d);
    }
}

/* The status code, as the module's header says: what decode._int makes of it where that is plain,
 * else the value for decode._int itself (a float: int() truncates, refuses NaN and infinity;
 * a string: int() takes signs, spaces, underscores and other scripts' digits). */
static PyObject *status_of(Span *sp)
{
    const Any *a = &sp->value[K_STATUS_CODE];
    if (attr_none(a))
        a = &sp->value[K_RESPONSE_STATUS_CODE];
    if (attr_none(a))
        return PyLong_FromLong(0);
    if (a->which == 2)
        return PyLong_FromLong(a->v != 0);
    if (a->which == 1 && a->str.n <= 18) {
        long long v = 0;
        size_t i = 0;
        for (; i < a->str.n && a->str.p[i] >= '0' && a->str.p[i] <= '9'; i++)
            v = v * 10 + (a->str.p[i] - '0');
        if (i == a->str.n)
            return PyLong_FromLongLong(v);
    }
    return attr_obj(a);
}

static PyObject *hex_of(Slice s)
{
    static const char digits[] = "0123456789abcdef";
    PyObject *u = PyUnicode_New((Py_ssize_t)(2 * s.n), 127);
    if (u == NULL)
        return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(u);
    for (size_t i = 0; i < s.n; i++) {
        d[2 * i] = (Py_UCS1)digits[s.p[i] >> 4];
        d[2 * i + 1] = (Py_UCS1)digits[s.p[i] & 15];
    }
    return u;
}

static const int RID_KEYS[] = {K_GUID_RID, K_HEADER_RID};
static const int PEER_KEYS[] = {K_PEER_ADDRESS, K_CLIENT_ADDRESS, K_NETWORK_PEER_ADDRESS, K_NET_PEER_IP};
static const int METHOD_KEYS[] = {K_HTTP_METHOD, K_REQUEST_METHOD};

/* Item i of tuple t (a new one: its items start NULL) set to expr's new reference; expr NULL (an
 * exception set) jumps to the caller's fail label, which drops t. */
#define SET(i, expr)                                                                               \
    do {                                                                                           \
        v = (expr);                                                                                \
        if (v == NULL)                                                                             \
            goto fail;                                                                             \
        PyTuple_SET_ITEM(t, i, v);                                                                 \
    } while (0)

static PyObject *span_tuple(Span *sp, Recent *recent)
{
    PyObject *t = PyTuple_New(17);
    PyObject *v;
    Slice cluster;
    if (t == NULL)
        return NULL;
    SET(0, hex_of(sp->trace_id));
    SET(1, hex_of(sp->span_id));
    SET(2, sp->parent.n ? hex_of(sp->parent) : Py_NewRef(Py_None));
    SET(3, PyLong_FromLong((long)(int32_t)sp->kind));
    /* as Python divides an int by a float: the int made a double (rounded to nearest), then divided */
    SET(4, PyFloat_FromDouble((double)sp->start / 1e9));
    SET(5, sp->end > sp->start ? PyFloat_FromDouble((double)(sp->end - sp->start) / 1e6) : Py_NewRef(Py_None));
    SET(6, key_sv(sp, K_NODE_ID, &recent[R_NODE]));
    SET(7, first_sv(sp, RID_KEYS, 2, NULL));
    SET(8, span_path(sp));
    if (!sv(&sp->value[K_CLUSTER], &cluster) && !sv(&sp->value[K_CLUSTER_NAME], &cluster))
        cluster = EMPTY;
    SET(9, recent_str(&recent[R_CLUSTER], cluster));
    SET(10, key_sv(sp, K_CANONICAL_SERVICE, &recent[R_CANONICAL]));
    SET(11, key_sv(sp, K_ISTIO_NAMESPACE, &recent[R_ISTIO_NS]));
    SET(12, key_sv(sp, K_SERVER_ADDRESS, NULL));
    SET(13, first_sv(sp, PEER_KEYS, 4, NULL));
    SET(14, first_sv(sp, METHOD_KEYS, 2, &recent[R_METHOD]));
    SET(15, status_of(sp));
    SET(16, key_sv(sp, K_USER_AGENT, &recent[R_AGENT]));
    return t;
fail:
    Py_DECREF(t);
    return NULL;
}

/* Span tuples of a ScopeSpans (spans = 2) appended to list. */
static int scan_scope(Slice s, PyObject *list, Span *sp, Recent *recent)
{
    Field f = {0};
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num != 2 || f.wt != WT_LEN)
            continue;
        int got = scan_span(f.s, sp);
        if (got < 0)
            return got;
        PyObject *t = span_tuple(sp, recent);
        if (t == NULL)
            return -1;
        int bad = PyList_Append(list, t);
        Py_DECREF(t);
        if (bad < 0)
            return -1;
    }
    return rc;
}

/* Resource: attributes = 1 (a map, its entries recorded in at). */
static int scan_resource(Slice s, Slice *at)
{
    Field f = {0};
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == 1 && f.wt == WT_LEN && record_entry(f.s, RESOURCE_KEY, RESOURCE_KEYS, at) < 0)
            return -1;
    }
    return rc;
}

/* ResourceSpans: resource = 1 (its occurrences merged), scope_spans = 2. Its tuple in *out. */
static int scan_resource_spans(Slice s, Span *sp, Recent *recent, PyObject **out)
{
    Field f = {0};
    int rc;
    Slice at[RESOURCE_KEYS] = {{NULL, 0}};
    Any value;
    PyObject *t = NULL, *v;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return -1;
    FOR_FIELDS(s, f, rc)
    {
        if (f.wt != WT_LEN)
            continue;
        int got = f.num == 1 ? scan_resource(f.s, at) : f.num == 2 ? scan_scope(f.s, list, sp, recent) : 0;
        if (got < 0) {
            rc = got;
            break;
        }
    }
    if (rc < 0)
        goto fail;
    rc = -1;
    if ((t = PyTuple_New(4)) == NULL)
        goto fail;
    for (int i = 0; i < RESOURCE_KEYS; i++) {
        if (entry_value(at[i], &value) < 0)
            goto fail;
        SET(i, attr_obj(&value));
    }
    PyTuple_SET_ITEM(t, 3, list);
    *out = t;
    return 0;
fail:
    Py_XDECREF(t);
    Py_XDECREF(list);
    return rc;
}
#undef SET

static PyObject *spans(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Slice msg = {(const uint8_t *)view.buf, (size_t)view.len};
    Field f = {0};
    int rc;
    Recent recent[RECENT];
    Span sp; /* one span's scan at a time, reused */
    memset(recent, 0, sizeof(recent));
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        rc = -1;
        goto done;
    }
    FOR_FIELDS(msg, f, rc)
    {
        if (f.num != 1 || f.wt != WT_LEN) /* ExportTraceServiceRequest: resource_spans = 1 */
            continue;
        PyObject *t;
        int got = scan_resource_spans(f.s, &sp, recent, &t);
        if (got < 0) {
            rc = got;
            break;
        }
        got = PyList_Append(out, t);
        Py_DECREF(t);
        if (got < 0) {
            rc = -1;
            break;
        }
    }
done:
    for (int i = 0; i < RECENT; i++)
        Py_XDECREF(recent[i].str);
    PyBuffer_Release(&view);
    if (rc == 0)
        return out;
    Py_XDECREF(out);
    if (rc == BAD_ID && !PyErr_Occurred())
        Py_RETURN_NONE;
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "the export could not be scanned");
    return NULL;
}

static PyMethodDef methods[] = {
    {"spans", spans, METH_O,
     "spans(data) -> a tuple per ResourceSpans (its service.name, service.namespace, k8s.namespace.name, "
     "and a tuple per span), or None when a span's id has the wrong size"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "meshaudit.receivers.otlp._spanscan",
    .m_doc = "What decode_traces reads of every span of an OTLP trace export, from its wire bytes.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__spanscan(void)
{
    return PyModule_Create(&module);
}
