/*
 * meshaudit.engine._fpmap: FpMap, a map from a key's 64-bit hash (its fingerprint) to a value,
 * for the stores written per entry (engine/fpmap.py lists them), first of all the correlation's
 * per-service indexes of request and trace ids (PairStore, engine/store.py).
 *
 * Why: those indexes take a write for nearly every access-log entry (the request id each
 * service's sidecar logged, the trace id of each inbound entry) and keep it for a minute. In a
 * dict each write kept the id's string alive for that minute (~100 bytes, 200 000 of them a
 * store): the allocator then served every new entry's objects from memory gone cold instead of
 * the memory the previous batch freed, and the whole receive path got slower. Here a slot is
 * the fingerprint and the value, 16 bytes in one array; nothing of the key is kept. Measured
 * with bench.ab (two daemons on one core, 25 entries a message): +9 % entries a second with
 * these maps under the per-service indexes, +16 % with them under the outbound index too.
 *
 * What it gives up: two keys with the same 64-bit hash are one key. Python hashes a string with
 * SipHash under a key drawn at start-up, so a collision between ids of the store's ~10^5 is a
 * chance of ~10^-14 a look-up, and nobody outside can aim one; the ids themselves come from the
 * client (x-request-id, traceparent), who can send any id it likes anyway. (With the key fixed,
 * PYTHONHASHSEED set, collisions could be computed, as for any dict: the daemon warns at start.)
 *
 * The same holds for the outbound index (request id and destination -> the client sidecar), a
 * GenStore of these maps, whose fair share among sidecars counts and splits its entries by value.
 *
 * A mapping with m[key] = value, m[key], key in m, len(m), get(key[, default]), values(),
 * partition(keep) and update(other); no deletion and no keys (its indexes are dropped a
 * generation at a time). It holds its values (interned parties, certificate strings, True) but
 * takes no part in the garbage collector: a value must not refer back to the map, and the
 * collector never walks the map's entries. meshaudit.engine.fpmap.HashMap is the same in Python:
 * the tests compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    uint64_t fp; /* the key's hash; 0: an empty slot */
    PyObject *value;
} Slot;

typedef struct {
    PyObject_HEAD
    Py_ssize_t used;
    size_t mask; /* slots - 1; the slots a power of two, at most half of them used */
    Slot *slots;
} FpMap;

static int fingerprint(PyObject *key, uint64_t *out)
{
    Py_hash_t h = PyObject_Hash(key);
    if (h == -1 && PyErr_Occurred())
        return -1;
    *out = h == 0 ? 1 : (uint64_t)h; /* 0 marks an empty slot: the key hashed 0 counts as 1 */
    return 0;
}

/* The slot of ``fp``, or the empty slot where it goes (linear probing; a hash is well mixed). */
static Slot *slot_of(const FpMap *m, uint64_t fp)
{
    size_t i = (size_t)fp & m->mask;
    for (;;) {
        Slot *s = &m->slots[i];
        if (s->fp == fp || s->fp == 0)
            return s;
        i = (i + 1) & m->mask;
    }
}

static int grow(FpMap *m)
{
    size_t n = (m->mask + 1) * 2;
    Slot *slots = PyMem_Calloc(n, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Slot *old = m->slots;
    size_t old_n = m->mask + 1;
    m->slots = slots;
    m->mask = n - 1;
    for (size_t i = 0; i < old_n; i++)
        if (old[i].fp != 0)
            *slot_of(m, old[i].fp) = old[i];
    PyMem_Free(old);
    return 0;
}

static FpMap *alloc_map(PyTypeObject *type)
{
    FpMap *m = (FpMap *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->mask = 7;
    m->slots = PyMem_Calloc(m->mask + 1, sizeof(Slot));
    if (m->slots == NULL) {
        Py_DECREF(m);
        PyErr_NoMemory();
        return NULL;
    }
    return m;
}

static PyObject *fpmap_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "FpMap() takes no arguments");
        return NULL;
    }
    return (PyObject *)alloc_map(type);
}

/* Set ``fp`` -> ``value`` in ``m`` (the map takes a new reference to the value). */
static int put_fp(FpMap *m, uint64_t fp, PyObject *value)
{
    Slot *s = slot_of(m, fp);
    if (s->fp == 0) {
        if ((size_t)(m->used + 1) * 2 > m->mask + 1) {
            if (grow(m) < 0)
                return -1;
            s = slot_of(m, fp);
        }
        s->fp = fp;
        m->used++;
    }
    Py_INCREF(value);
    Py_XSETREF(s->value, value); /* the old value released after the slot holds the new one */
    return 0;
}

static void fpmap_dealloc(FpMap *m)
{
    if (m->slots != NULL) {
        for (size_t i = 0; i <= m->mask; i++)
            Py_XDECREF(m->slots[i].value);
        PyMem_Free(m->slots);
    }
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t fpmap_len(FpMap *m)
{
    return m->used;
}

static int fpmap_set(FpMap *m, PyObject *key, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "an FpMap's keys cannot be deleted");
        return -1;
    }
    uint64_t fp;
    if (fingerprint(key, &fp) < 0)
        return -1;
    return put_fp(m, fp, value);
}

static PyObject *fpmap_getitem(FpMap *m, PyObject *key)
{
    uint64_t fp;
    if (fingerprint(key, &fp) < 0)
        return NULL;
    Slot *s = slot_of(m, fp);
    if (s->fp == 0) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return Py_NewRef(s->value);
}

static int fpmap_contains(FpMap *m, PyObject *key)
{
    uint64_t fp;
    if (fingerprint(key, &fp) < 0)
        return -1;
    return slot_of(m, fp)->fp != 0;
}

static PyObject *fpmap_get(FpMap *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key[, default])");
        return NULL;
    }
    uint64_t fp;
    if (fingerprint(args[0], &fp) < 0)
        return NULL;
    Slot *s = slot_of(m, fp);
    if (s->fp == 0)
        return Py_NewRef(nargs == 2 ? args[1] : Py_None);
    return Py_NewRef(s->value);
}

static PyObject *fpmap_values(FpMap *m, PyObject *unused)
{
    (void)unused;
    PyObject *out = PyList_New(m->used);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    for (size_t i = 0; i <= m->mask; i++)
        if (m->slots[i].fp != 0)
            PyList_SET_ITEM(out, k++, Py_NewRef(m->slots[i].value));
    return out;
}

/* partition(keep) -> (kept, rest): two new maps, of the entries whose value keep() finds true
 * and of the others. keep runs on each value: it must not change this map. */
static PyObject *fpmap_partition(FpMap *m, PyObject *keep)
{
    FpMap *kept = alloc_map(Py_TYPE(m));
    FpMap *rest = kept == NULL ? NULL : alloc_map(Py_TYPE(m));
    if (rest == NULL)
        goto fail;
    const Slot *slots = m->slots;
    const size_t mask = m->mask;
    for (size_t i = 0; i <= mask; i++) {
        if (slots[i].fp == 0)
            continue;
        uint64_t fp = slots[i].fp;
        PyObject *value = Py_NewRef(slots[i].value); /* held across the call */
        PyObject *r = PyObject_CallOneArg(keep, value);
        int yes = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
        if (yes >= 0 && (m->slots != slots || m->mask != mask)) { /* keep() grew this map */
            PyErr_SetString(PyExc_RuntimeError, "FpMap changed size during partition()");
            yes = -1;
        }
        if (yes < 0 || put_fp(yes ? kept : rest, fp, value) < 0) {
            Py_DECREF(value);
            goto fail;
        }
        Py_DECREF(value);
    }
    return Py_BuildValue("(NN)", (PyObject *)kept, (PyObject *)rest);
fail:
    Py_XDECREF(kept);
    Py_XDECREF(rest);
    return NULL;
}

/* update(other): every entry of another FpMap, set here (its value over this map's). */
static PyObject *fpmap_update(FpMap *m, PyObject *other)
{
    if (!PyObject_TypeCheck(other, Py_TYPE(m))) {
        PyErr_SetString(PyExc_TypeError, "update() takes another FpMap");
        return NULL;
    }
    FpMap *o = (FpMap *)other;
    if (o == m) /* nothing to add; and a growing map must not be read while it grows */
        Py_RETURN_NONE;
    for (size_t i = 0; i <= o->mask; i++)
        if (o->slots[i].fp != 0 && put_fp(m, o->slots[i].fp, o->slots[i].value) < 0)
            return NULL;
    Py_RETURN_NONE;
}

static PyMappingMethods fpmap_mapping = {
    .mp_length = (lenfunc)fpmap_len,
    .mp_subscript = (binaryfunc)fpmap_getitem,
    .mp_ass_subscript = (objobjargproc)fpmap_set,
};

static PySequenceMethods fpmap_sequence = {.sq_contains = (objobjproc)fpmap_contains};

static PyMethodDef fpmap_methods[] = {
    {"get", (PyCFunction)(void (*)(void))fpmap_get, METH_FASTCALL,
     "get(key[, default]) -> the value of key's fingerprint, else default (None)"},
    {"values", (PyCFunction)fpmap_values, METH_NOARGS, "values() -> a list of the values"},
    {"partition", (PyCFunction)fpmap_partition, METH_O,
     "partition(keep) -> (kept, rest): new maps of the entries whose value keep(value) finds true, "
     "and of the others"},
    {"update", (PyCFunction)fpmap_update, METH_O, "update(other): set every entry of another FpMap here"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FpMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "meshaudit.engine._fpmap.FpMap",
    .tp_basicsize = sizeof(FpMap),
    .tp_dealloc = (destructor)fpmap_dealloc,
    .tp_as_sequence = &fpmap_sequence,
    .tp_as_mapping = &fpmap_mapping,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A map from a key's 64-bit hash to a value: nothing of the key is kept.",
    .tp_methods = fpmap_methods,
    .tp_new = fpmap_new,
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "meshaudit.engine._fpmap",
    .m_doc = "FpMap: a map from a key's 64-bit hash to a value, for the correlation's id indexes.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fpmap(void)
{
    if (PyType_Ready(&FpMapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FpMap", (PyObject *)&FpMapType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
