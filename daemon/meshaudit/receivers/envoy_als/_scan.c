/*
 * meshaudit.receivers.envoy_als._scan: the fields of Envoy's HTTP access-log entries that every
 * rule reads, taken from a StreamAccessLogsMessage's wire bytes in one pass.
 *
 * Why: reading those fields through protobuf's Python objects costs ~1.6 us per entry (about
 * twenty attribute reads, each a upb look-up by name and a wrapper object), most of the decode.
 * This scan walks the bytes instead and returns one tuple per entry. It runs only on a message
 * that protobuf (upb) has already parsed without error, so it never decides what is valid: upb
 * does, and the receiver keeps upb's parsed message for every other field (read lazily). Still,
 * every read here is bounds-checked and anything unexpected (a group, a malformed varint, bytes
 * that are not UTF-8) ends the scan with ValueError; the caller then reads the fields through
 * protobuf (meshaudit.receivers.envoy_als.decode.read_http), which is the reference this scan must
 * equal (tests/unit/test_als_scan.py compares the two on generated and mutated messages).
 *
 * Protobuf's merge rules are kept: a field that appears more than once takes its last value; a
 * submessage that appears more than once is merged (scanned in order, later fields over earlier
 * ones); repeated fields concatenate; a oneof member clears the others (the message's
 * http_logs/tcp_logs, a SAN's uri/dns); a map's later duplicate key wins.
 *
 * http_fields(data: bytes) -> list[tuple] | None: None when the message's log_entries is not
 * http_logs. Per entry: (upstream_cluster: str, tls_version: str | None ("TLSv1.3", ..., "unknown"
 * out of range; None: no tls_properties), peer_uri: str | None (the first non-empty URI SAN of the
 * peer certificate), method: str ("GET", ..., "OTHER"), request_id: str | None, path: str | None
 * (None when empty), trace_id: str | None (from the traceparent header, as decode._trace_of),
 * response_code: int, upstream_request_attempt_count: int, start: float (start_time's seconds +
 * nanos * 1e-9, not clamped), duration_ms: float | None (None: no duration), response_flags: int
 * (as a TCP entry's), response_code_details: str).
 *
 * tcp_fields(data: bytes) -> list[tuple] | None, the same for TCP entries: (upstream_cluster,
 * tls_version, peer_uri, downstream_remote_address: str | None, upstream_local_address: str | None
 * (as decode._addr formats them), response_flags: int (bit n: ResponseFlags field n set),
 * connection_termination_details: str, start, duration_ms).
 *
 * Field numbers: proto/envoy/service/accesslog/v3/als.proto, proto/envoy/data/accesslog/v3/
 * accesslog.proto (the copies this project parses with).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* PyMemberDef: the offset of a __slots__ member */
#include <stdint.h>
#include <string.h>

#include "../protowire.h"

/* A config.core.v3.Address: oneof address { SocketAddress socket_address = 1; Pipe pipe = 2;
 * EnvoyInternalAddress envoy_internal_address = 3; } (which: 0 unset or none, else the member);
 * SocketAddress: string address = 2; oneof port_specifier { uint32 port_value = 3;
 * string named_port = 4; }; Pipe: string path = 1. */
typedef struct {
    int present;
    int which;
    Slice ip;
    uint32_t port;
    Slice path;
} Addr;

/* A google.protobuf.Timestamp or Duration: int64 seconds = 1; int32 nanos = 2 */
typedef struct {
    int64_t seconds;
    int32_t nanos;
} Time;

/* What one entry's scan keeps: slices into the message, and the scalars. */
typedef struct {
    Slice cluster;
    int has_tls;
    int32_t tls_version;
    int have_peer; /* a URI SAN was chosen (the first non-empty one) */
    Slice peer;
    int32_t method;
    Slice request_id;
    Slice path;
    int have_traceparent;
    Slice traceparent;
    uint32_t status;
    Slice details; /* response_code_details */
    uint32_t attempts;
    Time start;       /* start_time (unset: 0 s 0 ns) */
    int has_duration; /* duration appeared (HasField), even empty */
    Time duration;
    /* TCP entries only (scan_common reads these when tcp is set) */
    int tcp;
    Addr remote; /* downstream_remote_address */
    Addr local;  /* upstream_local_address */
    uint64_t flags;
    Slice termination;
} Entry;

static const Slice EMPTY = {(const uint8_t *)"", 0};

/* CertificateProperties.SubjectAltName: oneof san { string uri = 1; string dns = 2; } */
static int scan_san(Slice s, Entry *e)
{
    Field f;
    int rc;
    Slice uri = EMPTY;
    FOR_FIELDS(s, f, rc)
    {
        if (f.wt != WT_LEN)
            continue;
        if (f.num == 1)
            uri = f.s;
        else if (f.num == 2)
            uri = EMPTY; /* dns set: the oneof's uri is cleared */
    }
    if (rc < 0)
        return -1;
    if (!e->have_peer && uri.n > 0) {
        e->have_peer = 1;
        e->peer = uri;
    }
    return 0;
}

/* Scan every occurrence of submessage field num of s with scan (a repeated field's elements; a
 * singular one's parts, merged in order). */
static int scan_each(Slice s, uint32_t num, int (*scan)(Slice, Entry *), Entry *e)
{
    Field f;
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == num && f.wt == WT_LEN && scan(f.s, e) < 0)
            return -1;
    }
    return rc;
}

/* TLSProperties.CertificateProperties: repeated SubjectAltName subject_alt_name = 1 */
static int scan_cert(Slice s, Entry *e)
{
    return scan_each(s, 1, scan_san, e);
}

/* A Timestamp or Duration: every occurrence merges into t (a later value over an earlier one);
 * a value of another wire type is no value for upb (an unknown field) and is skipped here. */
static int scan_time(Slice s, Time *t)
{
    Field f;
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.wt != WT_VARINT)
            continue;
        if (f.num == 1)
            t->seconds = (int64_t)f.v;
        else if (f.num == 2)
            t->nanos = (int32_t)(uint32_t)f.v;
    }
    return rc;
}

/* TLSProperties: TLSVersion tls_version = 1; CertificateProperties peer_certificate_properties = 5 */
static int scan_tls(Slice s, Entry *e)
{
    Field f;
    int rc;
    e->has_tls = 1;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == 1 && f.wt == WT_VARINT)
            e->tls_version = (int32_t)(uint32_t)f.v;
        else if (f.num == 5 && f.wt == WT_LEN && scan_cert(f.s, e) < 0)
            return -1;
    }
    return rc;
}

static int scan_socket(Slice s, Addr *a)
{
    Field f;
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == 2 && f.wt == WT_LEN)
            a->ip = f.s;
        else if (f.num == 3 && f.wt == WT_VARINT)
            a->port = (uint32_t)f.v;
        else if (f.num == 4 && f.wt == WT_LEN)
            a->port = 0; /* named_port set: the oneof's port_value is cleared */
    }
    return rc;
}

static int scan_address(Slice s, Addr *a)
{
    Field f, g;
    int rc, rc2;
    a->present = 1;
    FOR_FIELDS(s, f, rc)
    {
        if (f.wt != WT_LEN || f.num < 1 || f.num > 3)
            continue;
        if (a->which != (int)f.num) { /* another member: the one before is cleared */
            a->ip = a->path = EMPTY;
            a->port = 0;
            a->which = (int)f.num;
        }
        if (f.num == 1) {
            if (scan_socket(f.s, a) < 0)
                return -1;
        } else if (f.num == 2) {
            FOR_FIELDS(f.s, g, rc2)
            {
                if (g.num == 1 && g.wt == WT_LEN)
                    a->path = g.s;
            }
            if (rc2 < 0)
                return -1;
        }
    }
    return rc;
}

/* ResponseFlags: bools 1..27 but 13, the Unauthorized message unauthorized_details = 13. Bit n
 * set: field n set (a bool true, the message present), as ListFields lists them. */
static int scan_flags(Slice s, uint64_t *mask)
{
    Field f;
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num < 1 || f.num > 27)
            continue;
        uint64_t bit = (uint64_t)1 << f.num;
        if (f.num == 13) {
            if (f.wt == WT_LEN)
                *mask |= bit;
        } else if (f.wt == WT_VARINT) {
            if (f.v)
                *mask |= bit;
            else
                *mask &= ~bit;
        }
    }
    return rc;
}

/* AccessLogCommon: tls_properties = 4, start_time = 5, upstream_cluster = 15, response_flags = 16,
 * duration = 23, upstream_request_attempt_count = 24; for TCP entries also
 * downstream_remote_address = 2, upstream_local_address = 14, connection_termination_details = 25 */
static int scan_common(Slice s, Entry *e)
{
    Field f;
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == 4 && f.wt == WT_LEN) {
            if (scan_tls(f.s, e) < 0)
                return -1;
        } else if (f.num == 15 && f.wt == WT_LEN) {
            e->cluster = f.s;
        } else if (f.num == 5 && f.wt == WT_LEN) {
            if (scan_time(f.s, &e->start) < 0)
                return -1;
        } else if (f.num == 23 && f.wt == WT_LEN) {
            e->has_duration = 1;
            if (scan_time(f.s, &e->duration) < 0)
                return -1;
        } else if (f.num == 24 && f.wt == WT_VARINT) {
            e->attempts = (uint32_t)f.v;
        } else if (f.num == 16 && f.wt == WT_LEN) {
            if (scan_flags(f.s, &e->flags) < 0)
                return -1;
        } else if (!e->tcp || f.wt != WT_LEN) {
            continue;
        } else if (f.num == 2) {
            if (scan_address(f.s, &e->remote) < 0)
                return -1;
        } else if (f.num == 14) {
            if (scan_address(f.s, &e->local) < 0)
                return -1;
        } else if (f.num == 25) {
            e->termination = f.s;
        }
    }
    return rc;
}

/* A request_headers map entry: string key = 1; string value = 2. An entry holding anything else
 * (another field, or its key or value in another wire type) is not in the map: upb keeps it as
 * an unknown field of the request, and an earlier entry of its key stays the header's value. */
static int scan_header(Slice s, Entry *e)
{
    Field f;
    int rc;
    Slice key = EMPTY, value = EMPTY;
    FOR_FIELDS(s, f, rc)
    {
        if (f.wt != WT_LEN || (f.num != 1 && f.num != 2))
            return 0;
        if (f.num == 1)
            key = f.s;
        else if (f.num == 2)
            value = f.s;
    }
    if (rc < 0)
        return -1;
    if (key.n == 11 && memcmp(key.p, "traceparent", 11) == 0) {
        e->have_traceparent = 1; /* a later duplicate key wins, as in the parsed map */
        e->traceparent = value;
    }
    return 0;
}

/* HTTPRequestProperties: request_method = 1, path = 5, request_id = 9, request_headers = 13 */
static int scan_request(Slice s, Entry *e)
{
    Field f;
    int rc;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == 1 && f.wt == WT_VARINT)
            e->method = (int32_t)(uint32_t)f.v;
        else if (f.num == 5 && f.wt == WT_LEN)
            e->path = f.s;
        else if (f.num == 9 && f.wt == WT_LEN)
            e->request_id = f.s;
        else if (f.num == 13 && f.wt == WT_LEN && scan_header(f.s, e) < 0)
            return -1;
    }
    return rc;
}

/* HTTPResponseProperties: google.protobuf.UInt32Value response_code = 1 (its uint32 value = 1) */
static int scan_response(Slice s, Entry *e)
{
    Field f, g;
    int rc, rc2;
    FOR_FIELDS(s, f, rc)
    {
        if (f.num == 6 && f.wt == WT_LEN)
            e->details = f.s;
        if (f.num != 1 || f.wt != WT_LEN)
            continue;
        FOR_FIELDS(f.s, g, rc2)
        {
            if (g.num == 1 && g.wt == WT_VARINT)
                e->status = (uint32_t)g.v;
        }
        if (rc2 < 0)
            return -1;
    }
    return rc;
}

static void entry_init(Entry *e, int tcp)
{
    memset(e, 0, sizeof(*e));
    e->cluster = e->peer = e->request_id = e->path = e->traceparent = e->termination = e->details = EMPTY;
    e->remote.ip = e->remote.path = e->local.ip = e->local.path = EMPTY;
    e->tcp = tcp;
}

/* TCPAccessLogEntry: common_properties = 1 */
static int scan_tcp_entry(Slice s, Entry *e)
{
    entry_init(e, 1);
    return scan_each(s, 1, scan_common, e);
}

/* HTTPAccessLogEntry: common_properties = 1, request = 3, response = 4 */
static int scan_entry(Slice s, Entry *e)
{
    Field f;
    int rc;
    entry_init(e, 0);
    FOR_FIELDS(s, f, rc)
    {
        if (f.wt != WT_LEN)
            continue;
        if (f.num == 1) {
            if (scan_common(f.s, e) < 0)
                return -1;
        } else if (f.num == 3) {
            if (scan_request(f.s, e) < 0)
                return -1;
        } else if (f.num == 4) {
            if (scan_response(f.s, e) < 0)
                return -1;
        }
    }
    return rc;
}

static PyObject *str_of(Slice s)
{
    return PyUnicode_DecodeUTF8((const char *)s.p, (Py_ssize_t)s.n, "strict");
}

static int ascii_only(Slice s)
{
    for (size_t i = 0; i < s.n; i++)
        if (s.p[i] & 0x80)
            return 0;
    return 1;
}

static const char ZERO_TRACE[32] = "00000000000000000000000000000000";

/* decode._trace_of: the trace id of "00-<32 hex>-<16 hex>-<2 hex>", lowercased; None when the
 * value is shorter than 55 characters, lacks the dashes at 2 and 35, or is all zeros. Counted in
 * characters, as Python's str does: a value with non-ASCII bytes is decoded first. */
static PyObject *trace_id_of(Entry *e)
{
    Slice tp = e->traceparent;
    if (!e->have_traceparent || tp.n < 55)
        Py_RETURN_NONE; /* fewer than 55 bytes is fewer than 55 characters */
    if (ascii_only(tp)) {
        char id[32];
        if (tp.p[2] != '-' || tp.p[35] != '-')
            Py_RETURN_NONE;
        for (int i = 0; i < 32; i++) {
            char c = (char)tp.p[3 + i];
            id[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
        if (memcmp(id, ZERO_TRACE, 32) == 0)
            Py_RETURN_NONE;
        return PyUnicode_DecodeASCII(id, 32, "strict");
    }
    PyObject *u = str_of(tp);
    if (u == NULL)
        return NULL;
    PyObject *out = NULL;
    if (PyUnicode_GET_LENGTH(u) < 55 || PyUnicode_READ_CHAR(u, 2) != '-' || PyUnicode_READ_CHAR(u, 35) != '-') {
        out = Py_NewRef(Py_None);
    } else {
        PyObject *part = PyUnicode_Substring(u, 3, 35);
        if (part != NULL) {
            out = PyObject_CallMethod(part, "lower", NULL);
            Py_DECREF(part);
            if (out != NULL && PyUnicode_CompareWithASCIIString(out, "00000000000000000000000000000000") == 0) {
                Py_SETREF(out, Py_NewRef(Py_None));
            }
        }
    }
    Py_DECREF(u);
    return out;
}

/* The names decode gives the two enums, made once (decode.TLS_VERSIONS, decode.METHODS). */
static const char *const TLS_NAMES[] = {"unknown", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"};
static const char *const METHOD_NAMES[] = {"OTHER", "GET",     "HEAD",  "POST",  "PUT",
                                           "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"};
static PyObject *tls_names[5], *method_names[10];
static PyObject *empty_str;

/* "TLSv1.3", ...; "unknown" for a version out of the enum's range; None for no tls_properties */
static PyObject *tls_name(Entry *e)
{
    if (!e->has_tls)
        Py_RETURN_NONE;
    int32_t v = e->tls_version;
    return Py_NewRef(tls_names[v >= 0 && v < 5 ? v : 0]);
}

/* "GET", ...; "OTHER" for METHOD_UNSPECIFIED and anything out of range */
static PyObject *method_name(int32_t m)
{
    return Py_NewRef(method_names[m > 0 && m < 10 ? m : 0]);
}

/* a string, or None when empty (request_id, path: decode keeps "" as None) */
static PyObject *str_or_none(Slice s)
{
    if (s.n == 0)
        Py_RETURN_NONE;
    return str_of(s);
}

/* The last string made of a value that repeats from entry to entry of one message (the upstream
 * cluster, the peer's URI SAN: one sidecar, few clusters and clients): equal bytes give the same
 * object again, whose hash Python has computed already. */
typedef struct {
    Slice bytes;
    PyObject *str;
} Recent;

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

/* Item i of tuple t (a new one: its items start NULL) set to expr's new reference; expr NULL (an
 * exception set) jumps to the caller's fail label, which drops t. */
#define SET(i, expr)                                                                               \
    do {                                                                                           \
        v = (expr);                                                                                \
        if (v == NULL)                                                                             \
            goto fail;                                                                             \
        PyTuple_SET_ITEM(t, i, v);                                                                 \
    } while (0)

/* decode._raw_start: seconds + nanos * 1e-9, each step as Python takes it (an int made a double,
 * rounded to nearest; no fused multiply-add: setup.py builds with -ffp-contract=off). */
static PyObject *start_of(Entry *e)
{
    double frac = (double)e->start.nanos * 1e-9;
    return PyFloat_FromDouble((double)e->start.seconds + frac);
}

/* decode._duration_ms: Duration.ToNanoseconds() / 1e6 (the exact integer of nanoseconds, made a
 * double rounded to nearest, then divided), None when the entry has no duration. */
static PyObject *duration_of(Entry *e)
{
    if (!e->has_duration)
        Py_RETURN_NONE;
    __int128 ns = (__int128)e->duration.seconds * 1000000000 + e->duration.nanos;
    return PyFloat_FromDouble((double)ns / 1e6);
}

/* The items both kinds of entry start with: the cluster, the TLS version's name, the peer URI SAN. */
static int set_common(PyObject *t, Entry *e, Recent *cluster, Recent *peer)
{
    PyObject *v;
    SET(0, recent_str(cluster, e->cluster));
    SET(1, tls_name(e));
    SET(2, e->has_tls && e->have_peer ? recent_str(peer, e->peer) : Py_NewRef(Py_None));
    return 0;
fail:
    return -1;
}

static PyObject *entry_tuple(Entry *e, Recent *cluster, Recent *peer, Recent *details)
{
    PyObject *t = PyTuple_New(13);
    PyObject *v;
    if (t == NULL)
        return NULL;
    if (set_common(t, e, cluster, peer) < 0)
        goto fail;
    SET(3, method_name(e->method));
    SET(4, str_or_none(e->request_id));
    SET(5, str_or_none(e->path));
    SET(6, trace_id_of(e));
    SET(7, PyLong_FromUnsignedLong((unsigned long)e->status));
    SET(8, PyLong_FromUnsignedLong((unsigned long)e->attempts));
    SET(9, start_of(e));
    SET(10, duration_of(e));
    SET(11, PyLong_FromUnsignedLongLong((unsigned long long)e->flags));
    SET(12, recent_str(details, e->details));
    return t;
fail:
    Py_DECREF(t);
    return NULL;
}

/* decode._addr: "ip:port", "[ipv6]:port", a pipe's path; None when unset or another kind. */
static PyObject *address_str(Addr *a)
{
    if (!a->present || (a->which != 1 && a->which != 2))
        Py_RETURN_NONE;
    if (a->which == 2)
        return str_of(a->path);
    /* a ':' byte is a ':' character: UTF-8 never uses ASCII bytes inside a multi-byte character */
    int v6 = memchr(a->ip.p, ':', a->ip.n) != NULL;
    uint8_t buf[128]; /* "[" ip "]:" port, made here: PyUnicode_FromFormat cost ~1.6 k instructions */
    if (a->ip.n <= sizeof(buf) - 14) {
        size_t n = 0;
        char digits[10];
        int k = 0;
        uint32_t port = a->port;
        if (v6)
            buf[n++] = '[';
        memcpy(buf + n, a->ip.p, a->ip.n);
        n += a->ip.n;
        if (v6)
            buf[n++] = ']';
        buf[n++] = ':';
        do {
            digits[k++] = (char)('0' + port % 10);
            port /= 10;
        } while (port);
        while (k)
            buf[n++] = (uint8_t)digits[--k];
        return str_of((Slice){buf, n});
    }
    PyObject *ip = str_of(a->ip);
    if (ip == NULL)
        return NULL;
    PyObject *out = PyUnicode_FromFormat(v6 ? "[%U]:%lu" : "%U:%lu", ip, (unsigned long)a->port);
    Py_DECREF(ip);
    return out;
}

static PyObject *tcp_tuple(Entry *e, Recent *cluster, Recent *peer)
{
    PyObject *t = PyTuple_New(9);
    PyObject *v;
    if (t == NULL)
        return NULL;
    if (set_common(t, e, cluster, peer) < 0)
        goto fail;
    SET(3, address_str(&e->remote));
    SET(4, address_str(&e->local));
    SET(5, PyLong_FromUnsignedLongLong((unsigned long long)e->flags));
    SET(6, str_of(e->termination));
    SET(7, start_of(e));
    SET(8, duration_of(e));
#undef SET
    return t;
fail:
    Py_DECREF(t);
    return NULL;
}

static PyObject *malformed(void)
{
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "the message could not be scanned");
    return NULL;
}

#define NITEMS 13 /* the items of an HTTP entry's tuple */
#define START_ITEM 9  /* its start: not stored when out of range */
#define FLAGS_ITEM 11 /* its response flags' mask, stored as flag_text(mask) */
#define NFIXED 4  /* _e, origin, observer, observer_service */

/* How fields_of makes a hop of each entry instead of a tuple (NULL: tuples). */
typedef struct {
    PyTypeObject *cls;           /* the hop's class: a Python class with __slots__ */
    Py_ssize_t item[NITEMS];     /* the slot each tuple item goes to (its offset in the object) */
    Py_ssize_t fixed[NFIXED];    /* the slots set alike on every hop of the message */
    PyObject *values[NFIXED];    /* (borrowed) their values */
    Py_ssize_t index;            /* the slot of the entry's index in its message */
    double earliest, latest;     /* a start outside is not stored: clamped (and counted) when read */
    PyObject *flag_text;         /* decode.flag_text: a mask's text ("" for none: not called) */
    /* The direction and parties, set here when the caches answer (decode.decode_http's loop, for
     * the common cases): else the hop goes to pending, for Python to set them. */
    PyObject *clusters;   /* naming.CLUSTERS: cluster name -> (copy, direction, named service) */
    PyObject *principals; /* Namer.principals: peer URI -> its Identity */
    PyObject *observer;   /* the stream's Identity */
    PyObject *default_direction;
    Py_ssize_t party[4];  /* the slots of direction, src, dst, conn */
    PyObject *pending;    /* a list */
} Maker;

/* The offset of the object slot a __slots__ member descriptor of a base of cls stands for. */
static int slot_offset(PyObject *d, PyTypeObject *cls, Py_ssize_t *out)
{
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyErr_SetString(PyExc_TypeError, "a slot is given by its member descriptor (Class.__dict__[name])");
        return -1;
    }
    PyMemberDescrObject *m = (PyMemberDescrObject *)d;
    if (m->d_member->type != T_OBJECT_EX || (m->d_member->flags & READONLY) ||
        !PyType_IsSubtype(cls, m->d_common.d_type)) {
        PyErr_SetString(PyExc_TypeError, "not a writable object slot of the hop's class");
        return -1;
    }
    *out = m->d_member->offset;
    return 0;
}

/* Store a new reference into the (still empty) slot at offset off of h. */
static inline void put_slot(PyObject *h, Py_ssize_t off, PyObject *v)
{
    PyObject **at = (PyObject **)((char *)h + off);
    Py_XSETREF(*at, v);
}

/* The (borrowed) value of the slot at offset off of h; NULL when empty. */
static inline PyObject *slot_value(PyObject *h, Py_ssize_t off)
{
    return *(PyObject **)((char *)h + off);
}

enum { UNKNOWN = 0, INBOUND = 1 }; /* meshaudit.model's directions */

/* Set h's direction, src, dst and conn as decode.decode_http does when the caches answer
 * (cluster known; inbound with a known peer certificate; outbound to a named service with a
 * request id): 1; 0 when Python must (h untouched); -1 on error. cluster, peer and rid are h's
 * items 0, 2 and 4. */
static int resolve(PyObject *h, Maker *mk, PyObject *cluster, PyObject *peer, PyObject *rid)
{
    PyObject *found = PyDict_GetItemWithError(mk->clusters, cluster);
    if (found == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_CheckExact(found) || PyTuple_GET_SIZE(found) != 3 || !PyLong_CheckExact(PyTuple_GET_ITEM(found, 1)))
        return 0;
    PyObject *direction = PyTuple_GET_ITEM(found, 1);
    long d = PyLong_AsLong(direction);
    if (d == -1 && PyErr_Occurred())
        return -1;
    if (d == 0) { /* `found[1] or default_direction` */
        direction = mk->default_direction;
        d = PyLong_AsLong(direction);
        if (d == -1 && PyErr_Occurred())
            return -1;
    }
    int has_peer = peer != Py_None && PyObject_IsTrue(peer);
    PyObject *src, *dst;
    if (d == UNKNOWN && has_peer) { /* the sidecar answered itself to a peer with a mesh certificate */
        d = INBOUND;
        direction = NULL;
    }
    if (d == INBOUND) {
        if (!has_peer)
            return 0; /* plaintext: the client's address is read through protobuf */
        src = PyDict_GetItemWithError(mk->principals, peer);
        if (src == NULL)
            return PyErr_Occurred() ? -1 : 0;
        dst = mk->observer;
    } else {
        dst = PyTuple_GET_ITEM(found, 2);
        if (dst == Py_None || rid == Py_None)
            return 0; /* an unnamed destination, or a connection key: through protobuf */
        src = mk->observer;
    }
    PyObject *dir_obj = direction != NULL ? Py_NewRef(direction) : PyLong_FromLong(d);
    if (dir_obj == NULL)
        return -1;
    put_slot(h, mk->party[0], dir_obj);
    put_slot(h, mk->party[1], Py_NewRef(src));
    put_slot(h, mk->party[2], Py_NewRef(dst));
    put_slot(h, mk->party[3], Py_NewRef(Py_None));
    return 1;
}

/* An entry's hop, made of its tuple t (whose items it takes) and the fixed slots. */
static PyObject *hop_of(PyObject *t, Py_ssize_t i, Maker *mk)
{
    PyObject *h = mk->cls->tp_alloc(mk->cls, 0);
    if (h == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *v = PyTuple_GET_ITEM(t, k);
        PyTuple_SET_ITEM(t, k, NULL); /* taken: the tuple is freed with NULL items */
        if (k == FLAGS_ITEM) {
            /* a mask of bits 1-27 (scan_flags): 0 is no flag, "" */
            int none = PyLong_AsUnsignedLongLong(v) == 0;
            PyObject *text = none ? Py_NewRef(empty_str) : PyObject_CallOneArg(mk->flag_text, v);
            Py_DECREF(v);
            if (text == NULL) {
                Py_DECREF(h);
                return NULL;
            }
            v = text;
        } else if (k == START_ITEM) {
            double when = PyFloat_AS_DOUBLE(v);
            if (!(mk->earliest <= when && when <= mk->latest)) {
                Py_DECREF(v); /* the slot stays empty: the hop's lazy read clamps and counts it */
                continue;
            }
        }
        put_slot(h, mk->item[k], v);
    }
    for (int k = 0; k < NFIXED; k++)
        put_slot(h, mk->fixed[k], Py_NewRef(mk->values[k]));
    PyObject *idx = PyLong_FromSsize_t(i);
    if (idx == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    put_slot(h, mk->index, idx);
    if (mk->clusters != NULL) {
        PyObject *cluster = slot_value(h, mk->item[0]), *peer = slot_value(h, mk->item[2]);
        int r = resolve(h, mk, cluster, peer, slot_value(h, mk->item[4]));
        if (r < 0 || (r == 0 && PyList_Append(mk->pending, h) < 0)) {
            Py_DECREF(h);
            return NULL;
        }
    }
    return h;
}

/* StreamAccessLogsMessage: oneof log_entries { HTTPAccessLogEntries http_logs = 2;
 * TCPAccessLogEntries tcp_logs = 3; }, each: repeated ... log_entry = 1. The tuples of the
 * entries of member `want` (2 or 3); None when the message's oneof ends on the other or none. */
static PyObject *fields_of(PyObject *arg, uint32_t want, Maker *mk)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Slice msg = {(const uint8_t *)view.buf, (size_t)view.len};
    PyObject *out = PyList_New(0);
    uint32_t member = 0;
    Field f, g;
    int rc, rc2;
    Entry e;
    Recent cluster = {EMPTY, NULL}, peer = {EMPTY, NULL}, details = {EMPTY, NULL};
    if (out == NULL)
        goto fail;
    FOR_FIELDS(msg, f, rc)
    {
        if (f.wt != WT_LEN || (f.num != 2 && f.num != 3))
            continue;
        if (f.num != member) { /* the oneof's other member is cleared */
            member = f.num;
            if (PyList_SetSlice(out, 0, PyList_GET_SIZE(out), NULL) < 0)
                goto fail;
        }
        if (f.num != want)
            continue;
        FOR_FIELDS(f.s, g, rc2)
        {
            if (g.num != 1 || g.wt != WT_LEN)
                continue;
            if ((want == 2 ? scan_entry(g.s, &e) : scan_tcp_entry(g.s, &e)) < 0)
                goto malformed;
            PyObject *t = want == 2 ? entry_tuple(&e, &cluster, &peer, &details) : tcp_tuple(&e, &cluster, &peer);
            if (t == NULL)
                goto fail;
            if (mk != NULL) {
                PyObject *h = hop_of(t, PyList_GET_SIZE(out), mk);
                Py_DECREF(t);
                if (h == NULL)
                    goto fail;
                t = h;
            }
            int bad = PyList_Append(out, t);
            Py_DECREF(t);
            if (bad < 0)
                goto fail;
        }
        if (rc2 < 0)
            goto malformed;
    }
    if (rc < 0)
        goto malformed;
    Py_XDECREF(cluster.str);
    Py_XDECREF(peer.str);
    Py_XDECREF(details.str);
    PyBuffer_Release(&view);
    if (member != want) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
malformed:
    malformed();
fail:
    Py_XDECREF(cluster.str);
    Py_XDECREF(peer.str);
    Py_XDECREF(details.str);
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *http_fields(PyObject *self, PyObject *arg)
{
    (void)self;
    return fields_of(arg, 2, NULL);
}

static PyObject *tcp_fields(PyObject *self, PyObject *arg)
{
    (void)self;
    return fields_of(arg, 3, NULL);
}

/* http_hops(data, cls, items, fixed, values, index, earliest, latest, flag_text[, caches,
 * party, pending]): the hops of the message's HTTP entries (None: it holds none), each a new cls
 * (tp_alloc: its slots empty) whose slots items[k] (member descriptors) hold the tuple
 * http_fields gives, item by item, fixed[k] hold values[k], and index the entry's index in the
 * message; a start (item 9) outside [earliest, latest] is left unset (the hop's class reads it
 * lazily: clamped and counted then, as an entry read through protobuf), the response
 * flags' mask (item 11) as flag_text(mask) ("" for none). With caches
 * (clusters, principals, observer, default direction) the party slots (direction, src, dst,
 * conn) are set where they answer (``resolve``); the other hops are appended to pending. */
static PyObject *http_hops(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Maker mk;
    if (nargs != 9 && nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "http_hops takes 9 or 12 arguments");
        return NULL;
    }
    PyObject *items = args[2], *fixed = args[3], *values = args[4];
    if (!PyType_Check(args[1]) || !PyTuple_Check(items) || PyTuple_GET_SIZE(items) != NITEMS ||
        !PyTuple_Check(fixed) || PyTuple_GET_SIZE(fixed) != NFIXED || !PyTuple_Check(values) ||
        PyTuple_GET_SIZE(values) != NFIXED) {
        PyErr_SetString(PyExc_TypeError, "http_hops: a class, 13 item slots, 4 fixed slots and their 4 values");
        return NULL;
    }
    mk.cls = (PyTypeObject *)args[1];
    for (Py_ssize_t k = 0; k < NITEMS; k++)
        if (slot_offset(PyTuple_GET_ITEM(items, k), mk.cls, &mk.item[k]) < 0)
            return NULL;
    for (Py_ssize_t k = 0; k < NFIXED; k++) {
        if (slot_offset(PyTuple_GET_ITEM(fixed, k), mk.cls, &mk.fixed[k]) < 0)
            return NULL;
        mk.values[k] = PyTuple_GET_ITEM(values, k);
    }
    if (slot_offset(args[5], mk.cls, &mk.index) < 0)
        return NULL;
    mk.earliest = PyFloat_AsDouble(args[6]);
    mk.latest = PyFloat_AsDouble(args[7]);
    if (PyErr_Occurred())
        return NULL;
    mk.flag_text = args[8];
    mk.clusters = NULL;
    if (nargs == 12) {
        PyObject *caches = args[9], *party = args[10];
        if (!PyTuple_Check(caches) || PyTuple_GET_SIZE(caches) != 4 || !PyDict_Check(PyTuple_GET_ITEM(caches, 0)) ||
            !PyDict_Check(PyTuple_GET_ITEM(caches, 1)) || !PyLong_Check(PyTuple_GET_ITEM(caches, 3)) ||
            !PyTuple_Check(party) || PyTuple_GET_SIZE(party) != 4 || !PyList_Check(args[11])) {
            PyErr_SetString(PyExc_TypeError,
                            "http_hops: (clusters, principals, observer, default direction), 4 party slots, a list");
            return NULL;
        }
        for (Py_ssize_t k = 0; k < 4; k++)
            if (slot_offset(PyTuple_GET_ITEM(party, k), mk.cls, &mk.party[k]) < 0)
                return NULL;
        mk.clusters = PyTuple_GET_ITEM(caches, 0);
        mk.principals = PyTuple_GET_ITEM(caches, 1);
        mk.observer = PyTuple_GET_ITEM(caches, 2);
        mk.default_direction = PyTuple_GET_ITEM(caches, 3);
        mk.pending = args[11];
    }
    return fields_of(args[0], 2, &mk);
}

static PyMethodDef methods[] = {
    {"http_fields", http_fields, METH_O,
     "http_fields(data) -> list of per-entry tuples, or None when the message holds no HTTP entries"},
    {"tcp_fields", tcp_fields, METH_O,
     "tcp_fields(data) -> list of per-entry tuples, or None when the message holds no TCP entries"},
    {"http_hops", (PyCFunction)(void (*)(void))http_hops, METH_FASTCALL,
     "http_hops(data, cls, items, fixed, values, index, earliest, latest, flag_text[, caches, party, "
     "pending]) "
     "-> list of hops, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "meshaudit.receivers.envoy_als._scan",
    .m_doc = "The fields of Envoy's HTTP access-log entries every rule reads, from a message's wire bytes.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__scan(void)
{
    for (int i = 0; i < 5; i++)
        if (tls_names[i] == NULL && (tls_names[i] = PyUnicode_InternFromString(TLS_NAMES[i])) == NULL)
            return NULL;
    for (int i = 0; i < 10; i++)
        if (method_names[i] == NULL && (method_names[i] = PyUnicode_InternFromString(METHOD_NAMES[i])) == NULL)
            return NULL;
    if (empty_str == NULL && (empty_str = PyUnicode_FromString("")) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
