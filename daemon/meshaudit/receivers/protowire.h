/*
 * Reading protobuf's wire format, for meshaudit's scanners of messages upb has already parsed
 * (envoy_als/_scan.c, otlp/_spanscan.c): fields one at a time, every read bounds-checked, a
 * group or a malformed varint an error. Static inline: each scanner compiles its own copy.
 */
#ifndef MESHAUDIT_PROTOWIRE_H
#define MESHAUDIT_PROTOWIRE_H

#include <stddef.h>
#include <stdint.h>

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

typedef struct {
    const uint8_t *p;
    size_t n;
} Slice;

/* A field read from the wire: its number, wire type, and value (varint, fixed64) or bytes (LEN). */
typedef struct {
    uint32_t num;
    int wt;
    uint64_t v;
    Slice s;
} Field;

static int read_long_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (i == 9 && b > 1)
                return -1; /* more than 64 bits */
            *pp = p;
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* Nearly every tag and length is one or two bytes: those cases inline, the rest above. */
__attribute__((always_inline)) static inline int read_varint(const uint8_t **pp, const uint8_t *end,
                                                             uint64_t *out)
{
    const uint8_t *p = *pp;
    if (p < end && *p < 0x80) {
        *out = *p;
        *pp = p + 1;
        return 0;
    }
    if (end - p >= 2 && p[1] < 0x80) { /* a submessage's length, mostly */
        *out = (uint64_t)(p[0] & 0x7f) | ((uint64_t)p[1] << 7);
        *pp = p + 2;
        return 0;
    }
    return read_long_varint(pp, end, out);
}

/* The next field of [*pp, end): 1 read, 0 at the end, -1 malformed or a group. Always inlined:
 * it runs ~90 times a span or an entry, and gcc's own choice (a call) costs ~0.15 us a span. */
__attribute__((always_inline)) static inline int next_field(const uint8_t **pp, const uint8_t *end, Field *f)
{
    uint64_t tag, len;
    if (*pp >= end)
        return 0;
    if (read_varint(pp, end, &tag) < 0 || tag > UINT32_MAX || (tag >> 3) == 0)
        return -1;
    f->num = (uint32_t)(tag >> 3);
    f->wt = (int)(tag & 7);
    switch (f->wt) {
    case WT_VARINT:
        return read_varint(pp, end, &f->v) < 0 ? -1 : 1;
    case WT_I64:
        if ((size_t)(end - *pp) < 8)
            return -1;
        f->v = 0;
        for (int i = 7; i >= 0; i--) /* little-endian on the wire, whatever the machine */
            f->v = (f->v << 8) | (*pp)[i];
        *pp += 8;
        return 1;
    case WT_I32:
        if ((size_t)(end - *pp) < 4)
            return -1;
        *pp += 4;
        return 1;
    case WT_LEN:
        if (read_varint(pp, end, &len) < 0 || len > (uint64_t)(end - *pp) || len > INT32_MAX)
            return -1;
        f->s.p = *pp;
        f->s.n = (size_t)len;
        *pp += len;
        return 1;
    default: /* groups (3, 4) and the invalid wire types 6, 7: upb never hands us these here */
        return -1;
    }
}

/* Each field of a slice into f; rc is then 0 (the end) or -1 (malformed). Nested loops use
 * different f, so their cursors (named after f) do not shadow each other. */
#define FOR_FIELDS(slice, f, rc)                                                                   \
    for (const uint8_t *f##_p = (slice).p, *f##_end = (slice).p + (slice).n;                     \
         (rc = next_field(&f##_p, f##_end, &f)) > 0;)

#endif
