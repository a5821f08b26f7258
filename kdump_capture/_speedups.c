/*
 * kdump_capture._speedups: the per-page loops of a save, compiled.
 *
 * Each function mirrors a pure-Python reference that stays the specification:
 *   scan_window  <- kdump_capture.formats.filter.scan_window (struct-page walk)
 *   zero_pages   <- kdump_capture.formats.source.zero_mask_py (all-zero pages)
 *   zlib_pages   <- kdump_capture.formats.kdump.ZlibCodec.pack_py (compress2 level 1;
 *                   our own deflate of it in _deflate1.c, zlib's when they disagree)
 *   zstd_pages   <- kdump_capture.formats.kdump.ZstdCodec.pack_py (one frame per page)
 *   lzo_pages    <- kdump_capture.formats.kdump.LzoCodec.pack_py (lzo1x_1 per page)
 *   page_descs   <- kdump_capture.formats.kdump.page_descs_py (page_desc records)
 * tests/test_speedups.py checks that both give the same bitmaps and bytes. The GIL is
 * released while a function works on buffers the caller keeps alive.
 *
 * zstd_pages is there only when setup.py found zstd.h (it then defines HAVE_ZSTD and links
 * libzstd); without it the module still builds and ZstdCodec keeps python-zstandard.
 * lzo_pages likewise needs lzo/lzo1x.h (HAVE_LZO, links liblzo2); without it LzoCodec keeps
 * python-lzo.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>
#ifdef HAVE_ZSTD
#include <zstd.h>
#include <zstd_errors.h>
#endif
#ifdef HAVE_LZO
#include <lzo/lzo1x.h>
#endif

#define PAGE 4096
#define PGMM_CACHED 512
#define MAX_ORDER_BITS 64
#define NO_OFFSET UINT64_MAX
#define UNREADABLE UINT64_MAX
#define ZERO_FILL (UINT64_MAX - 1)
#define PAGE_MAPPING_ANON 1
#define NCOUNTERS 6

/* Indexes of the parameter tuple (filter._rule_params). */
enum {
    P_SIZE, P_FLAGS, P_MAPPING, P_MAPCOUNT, P_PRIVATE, P_CHEAD, P_ORDER, P_DTOR, P_LRU, P_PRIV,
    P_SWAPCACHE, P_SWAPBACKED, P_HAS_SWAPBACKED, P_HEAD, P_HWPOISON, P_SLAB_BIT, P_SLAB_MC,
    P_HAS_SLAB_MC, P_BUDDY, P_OFFLINE, P_HAS_OFFLINE, P_DTOR_HUGETLB, P_HAS_DTOR_HUGETLB,
    P_NR_FREE_AREA, P_HAS_NR_FREE_AREA, P_EX_FREE, P_EX_CACHE, P_EX_CACHE_PRI, P_EX_USER,
    P_COUNT
};

typedef struct { uint64_t va, end, off; } extent_t;
typedef struct { uint64_t start, end, mem_map; } section_t;

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t umax(uint64_t a, uint64_t b) { return a > b ? a : b; }
static inline uint64_t umin(uint64_t a, uint64_t b) { return a < b ? a : b; }
static inline uint64_t sat_add(uint64_t a, uint64_t b) { return a + b < a ? UINT64_MAX : a + b; }

/* Bits [start, end) of bm cleared (filter._fill_range). */
static void clear_bits(uint8_t *bm, uint64_t start, uint64_t end)
{
    if (start >= end)
        return;
    uint64_t first = start >> 3, last = (end - 1) >> 3;
    uint8_t lo = (uint8_t)(0xFF << (start & 7));
    uint8_t hi = (uint8_t)(0xFF >> (7 - ((end - 1) & 7)));
    if (first == last) {
        bm[first] &= (uint8_t)~(lo & hi);
        return;
    }
    bm[first] &= (uint8_t)~lo;
    bm[last] &= (uint8_t)~hi;
    if (last > first + 1)
        memset(bm + first + 1, 0, last - first - 1);
}

/* Read n bytes of struct pages at va through the extents; -1 if any byte is unreadable. */
static int read_va(int fd, uint64_t base, const extent_t *ext, Py_ssize_t n_ext, uint64_t va,
                   size_t n, uint8_t *dst)
{
    Py_ssize_t lo = 0, hi = n_ext; /* first extent with ext.va > va, minus one */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (ext[mid].va <= va)
            lo = mid + 1;
        else
            hi = mid;
    }
    Py_ssize_t i = lo - 1;
    while (n > 0) {
        if (i < 0 || i >= n_ext)
            return -1;
        const extent_t *e = &ext[i];
        if (va < e->va || va >= e->end || e->off == UNREADABLE)
            return -1;
        size_t k = (size_t)umin(n, e->end - va);
        if (e->off == ZERO_FILL) {
            memset(dst, 0, k);
        } else {
            size_t done = 0;
            while (done < k) {
                ssize_t r = pread(fd, dst + done, k - done, (off_t)(base + e->off + (va - e->va) + done));
                if (r < 0 && errno == EINTR)
                    continue;
                if (r <= 0)
                    return -1;
                done += (size_t)r;
            }
        }
        dst += k;
        va += k;
        n -= k;
        i++;
    }
    return 0;
}

typedef struct {
    int64_t skip_sec;
    uint64_t skip_to, carry_end, unreadable, bad_order;
    uint64_t counts[NCOUNTERS];
} scan_state_t;

static void scan(int fd, uint64_t base, const extent_t *ext, Py_ssize_t n_ext,
                 const section_t *secs, Py_ssize_t n_secs, const uint64_t *p, uint64_t ws,
                 uint64_t we, const uint8_t *in_segs, uint8_t *bm2, uint8_t *raw,
                 scan_state_t *st)
{
    const uint64_t size = p[P_SIZE];
    const uint64_t nr_free_area = p[P_HAS_NR_FREE_AREA] ? p[P_NR_FREE_AREA] : MAX_ORDER_BITS;
    for (Py_ssize_t si = 0; si < n_secs; si++) {
        const section_t *s = &secs[si];
        uint64_t skip_to = (st->skip_sec >= 0 && (uint64_t)st->skip_sec == s->start)
                               ? st->skip_to : s->start;
        uint64_t lo = umax(s->start, ws), hi = umin(s->end, we);
        uint64_t blk = lo - lo % PGMM_CACHED;
        while (blk < hi) {
            uint64_t b_start = umax(umax(blk, lo), skip_to);
            uint64_t b_end = umin(blk + PGMM_CACHED, hi);
            blk += PGMM_CACHED;
            if (b_start >= b_end)
                continue;
            uint64_t sb = (b_start - ws) >> 3, se = (b_end - ws + 7) >> 3;
            int any = 0, all = 1;
            for (uint64_t b = sb; b < se; b++) {
                any |= in_segs[b] != 0;
                all &= in_segs[b] == 0xFF;
            }
            if (!any)
                continue;
            size_t raw_len = (size_t)((b_end - b_start) * size);
            if (read_va(fd, base, ext, n_ext, s->mem_map + (b_start - s->start) * size, raw_len,
                        raw) < 0) {
                st->unreadable += b_end - b_start;
                continue;
            }
            int all_in = (b_start & 7) == 0 && (b_end & 7) == 0 && all;
            for (uint64_t pfn = b_start; pfn < b_end; pfn++) {
                if (pfn < skip_to)
                    continue;
                uint64_t rel = pfn - ws;
                if (!all_in && !((in_segs[rel >> 3] >> (rel & 7)) & 1))
                    continue;
                const uint8_t *rec = raw + (pfn - b_start) * size;
                if (p[P_CHEAD] != NO_OFFSET && (ld64(rec + p[P_CHEAD]) & 1))
                    continue;
                uint64_t flags = ld64(rec + p[P_FLAGS]);
                uint64_t mapping = ld64(rec + p[P_MAPPING]);
                uint64_t mapcount = p[P_MAPCOUNT] != NO_OFFSET ? ld32(rec + p[P_MAPCOUNT]) : 0;
                int is_slab = p[P_HAS_SLAB_MC] ? mapcount == p[P_SLAB_MC]
                                               : (flags & p[P_SLAB_BIT]) != 0;
                uint64_t nr_order = 0, dtor = 0;
                if ((flags & p[P_HEAD]) && pfn % PGMM_CACHED < PGMM_CACHED - 1) {
                    size_t nxt = (size_t)((pfn - b_start + 1) * size);
                    if (nxt < raw_len) {
                        if (p[P_ORDER])
                            nr_order = raw[nxt + p[P_ORDER]];
                        if (p[P_DTOR])
                            dtor = raw[nxt + p[P_DTOR]];
                    }
                    if (nr_order >= MAX_ORDER_BITS || (pfn & ((1ULL << nr_order) - 1)))
                        nr_order = 0;
                }
                int reason;
                if (p[P_EX_FREE] && !is_slab && mapcount == p[P_BUDDY]) {
                    uint64_t private_ = ld64(rec + p[P_PRIVATE]);
                    if (private_ >= nr_free_area || private_ >= MAX_ORDER_BITS) {
                        st->bad_order++;
                        continue;
                    }
                    nr_order = private_;
                    reason = 0;
                } else if ((p[P_EX_CACHE] || p[P_EX_CACHE_PRI]) &&
                           ((flags & p[P_LRU]) ||
                            ((!p[P_HAS_SWAPBACKED] || (flags & p[P_SWAPBACKED])) &&
                             (flags & p[P_SWAPCACHE]))) &&
                           !(mapping & PAGE_MAPPING_ANON) &&
                           (p[P_EX_CACHE_PRI] || !(flags & p[P_PRIV]))) {
                    reason = (flags & p[P_PRIV]) ? 2 : 1;
                } else if (p[P_EX_USER] && ((mapping & PAGE_MAPPING_ANON) ||
                                            (p[P_HAS_DTOR_HUGETLB] && dtor == p[P_DTOR_HUGETLB]))) {
                    reason = 3;
                } else if (p[P_HWPOISON] && (flags & p[P_HWPOISON])) {
                    reason = 4;
                } else if (p[P_HAS_OFFLINE] && !(flags & p[P_SLAB_BIT]) &&
                           mapcount == p[P_OFFLINE]) {
                    reason = 5;
                } else {
                    continue;
                }
                uint64_t n = 1ULL << nr_order;
                uint64_t end = pfn + n;
                clear_bits(bm2, pfn - ws, umin(end, we) - ws);
                if (end > we)
                    st->carry_end = umax(st->carry_end, end);
                st->counts[reason] = sat_add(st->counts[reason], n);
                if (n > 1)
                    skip_to = end;
            }
        }
        if (s->end > we) {
            st->skip_sec = (int64_t)s->start;
            st->skip_to = skip_to;
        }
    }
}

/* Each struct page field the walk reads lies inside SIZE(page): filter.PageRules checks the
 * offsets read from VMCOREINFO, and this checks them again where they are used. */
static int fields_fit(const uint64_t *p)
{
    static const struct { int at, width, optional; } fields[] = {
        {P_FLAGS, 8, 0}, {P_MAPPING, 8, 0}, {P_MAPCOUNT, 4, 1}, {P_PRIVATE, 8, 1},
        {P_CHEAD, 8, 1}, {P_ORDER, 1, 0}, {P_DTOR, 1, 0},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        uint64_t off = p[fields[i].at];
        if (fields[i].optional && off == NO_OFFSET)
            continue;
        if (off > p[P_SIZE] || p[P_SIZE] - off < (uint64_t)fields[i].width)
            return 0;
    }
    /* a free page's order is read from page.private, which must then be known */
    return !p[P_EX_FREE] || (p[P_PRIVATE] != NO_OFFSET && p[P_MAPCOUNT] != NO_OFFSET);
}

static PyObject *py_scan_window(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long base, ws, we, skip_to, carry_end;
    long long skip_sec;
    Py_buffer ext_b, sec_b, in_b, bm_b;
    PyObject *params;
    if (!PyArg_ParseTuple(args, "iKy*y*OKKy*w*(LKK)", &fd, &base, &ext_b, &sec_b, &params, &ws,
                          &we, &in_b, &bm_b, &skip_sec, &skip_to, &carry_end))
        return NULL;
    PyObject *result = NULL;
    uint64_t p[P_COUNT];
    uint8_t *raw = NULL;
    if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != P_COUNT) {
        PyErr_SetString(PyExc_ValueError, "scan_window: bad parameter tuple");
        goto out;
    }
    for (int i = 0; i < P_COUNT; i++) {
        p[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(params, i));
        if (PyErr_Occurred())
            goto out;
    }
    if (p[P_SIZE] == 0 || p[P_SIZE] > 256 || !fields_fit(p) || ext_b.len % sizeof(extent_t) ||
        sec_b.len % sizeof(section_t) || we <= ws || (we - ws) % 8 ||
        (uint64_t)in_b.len < (we - ws) / 8 || (uint64_t)bm_b.len < (we - ws) / 8) {
        PyErr_SetString(PyExc_ValueError, "scan_window: inconsistent arguments");
        goto out;
    }
    raw = PyMem_RawMalloc(PGMM_CACHED * p[P_SIZE]);
    if (!raw) {
        PyErr_NoMemory();
        goto out;
    }
    scan_state_t st = {skip_sec, skip_to, carry_end, 0, 0, {0}};
    Py_BEGIN_ALLOW_THREADS
    scan(fd, base, ext_b.buf, ext_b.len / (Py_ssize_t)sizeof(extent_t), sec_b.buf,
         sec_b.len / (Py_ssize_t)sizeof(section_t), p, ws, we, in_b.buf, bm_b.buf, raw, &st);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(LKKKKKKKKKK)", (long long)st.skip_sec, st.skip_to, st.carry_end,
                           st.unreadable, st.bad_order, st.counts[0], st.counts[1],
                           st.counts[2], st.counts[3], st.counts[4], st.counts[5]);
out:
    PyMem_RawFree(raw);
    PyBuffer_Release(&ext_b);
    PyBuffer_Release(&sec_b);
    PyBuffer_Release(&in_b);
    PyBuffer_Release(&bm_b);
    return result;
}

/* Four accumulators over 256 bytes between tests: the loads do not wait on one another
 * (plain C that compilers turn into wide loads; ~10% off a memory-bound scan here). */
static inline int page_is_zero(const uint8_t *pg)
{
    for (int i = 0; i < PAGE; i += 256) {
        uint64_t a = 0, b = 0, c = 0, d = 0;
        for (int j = 0; j < 256; j += 32) {
            a |= ld64(pg + i + j);
            b |= ld64(pg + i + j + 8);
            c |= ld64(pg + i + j + 16);
            d |= ld64(pg + i + j + 24);
        }
        if (a | b | c | d)
            return 0;
    }
    return 1;
}

/* Offsets of n pages in a buffer, checked: each page lies inside it. */
static int page_offsets(Py_buffer *src, Py_buffer *offs, const char *who)
{
    const uint64_t *off = offs->buf;
    if (offs->len % 8)
        goto bad;
    for (Py_ssize_t i = 0; i < offs->len / 8; i++)
        if (off[i] > (uint64_t)src->len || (uint64_t)src->len - off[i] < PAGE)
            goto bad;
    return 0;
bad:
    PyErr_Format(PyExc_ValueError, "%s: page offsets outside the buffer", who);
    return -1;
}

/* zero_pages(src, offsets) -> bytes: one bit per page (LSB first), 1 = all zero. */
static PyObject *py_zero_pages(PyObject *self, PyObject *args)
{
    Py_buffer src, offs;
    if (!PyArg_ParseTuple(args, "y*y*", &src, &offs))
        return NULL;
    PyObject *out = NULL;
    if (page_offsets(&src, &offs, "zero_pages") == 0) {
        Py_ssize_t n = offs.len / 8;
        out = PyBytes_FromStringAndSize(NULL, (n + 7) / 8);
        if (out) {
            uint8_t *m = (uint8_t *)PyBytes_AS_STRING(out);
            const uint64_t *off = offs.buf;
            const uint8_t *base = src.buf;
            memset(m, 0, (n + 7) / 8);
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t i = 0; i < n; i++)
                if (page_is_zero(base + off[i]))
                    m[i >> 3] |= (uint8_t)(1 << (i & 7));
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&offs);
    return out;
}

/*
 * One page codec for pack_pages: compress the page pg into dst (room for cd->bound bytes)
 * and return the stored size; PAGE or more means "store the page raw" (compression did
 * not shrink it); (size_t)-1 is a failure, with its code in *err for cd->fail.
 */
typedef struct codec {
    const char *who;
    size_t bound;
    size_t (*page)(struct codec *cd, const uint8_t *pg, uint8_t *dst, long *err);
    void (*fail)(struct codec *cd, long err);
    void *state;
} codec_t;

/*
 * The loop every *_pages function shares: each page src[offsets[i]:+4096] is stored as the
 * codec's output, or raw when that is not smaller; words[i] (u64) = stored size |
 * flag << 32, or 0 for an all-zero page when zero_dedup (nothing stored; the zero check and
 * the codec run in one pass over the page). The stored bytes go to out back to back; out
 * holds n pages (a stored page is never larger), so a codec whose output may overrun a
 * page (cd->bound > PAGE) writes the last pages into a scratch buffer first.
 * Returns (data_len, words).
 */
static PyObject *pack_pages(codec_t *cd, Py_buffer *src, Py_buffer *offs, int zero_dedup,
                            unsigned int flag, Py_buffer *out)
{
    if (page_offsets(src, offs, cd->who) < 0)
        return NULL;
    Py_ssize_t n = offs->len / 8;
    if (out->len < n * PAGE) {
        PyErr_Format(PyExc_ValueError, "%s: output buffer too small", cd->who);
        return NULL;
    }
    uint8_t *scratch = NULL;
    if (cd->bound > PAGE && !(scratch = PyMem_RawMalloc(cd->bound)))
        return PyErr_NoMemory();
    PyObject *words = PyBytes_FromStringAndSize(NULL, n * 8);
    if (!words) {
        PyMem_RawFree(scratch);
        return NULL;
    }
    const uint64_t *off = offs->buf;
    uint64_t *w = (uint64_t *)PyBytes_AS_STRING(words);
    uint8_t *o = out->buf;
    Py_ssize_t pos = 0;
    long err = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *pg = (const uint8_t *)src->buf + off[i];
        if (zero_dedup && page_is_zero(pg)) {
            w[i] = 0;
            continue;
        }
        uint8_t *dst = (size_t)(out->len - pos) >= cd->bound ? o + pos : scratch;
        size_t r = cd->page(cd, pg, dst, &err);
        if (r == (size_t)-1) {
            failed = 1;
            break;
        }
        if (r < PAGE) {
            if (dst != o + pos)
                memcpy(o + pos, dst, r);
            w[i] = r | (uint64_t)flag << 32;
            pos += (Py_ssize_t)r;
        } else {
            memcpy(o + pos, pg, PAGE);
            w[i] = PAGE;
            pos += PAGE;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scratch);
    if (failed) {
        Py_DECREF(words);
        cd->fail(cd, err);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(nO)", pos, words);
    Py_DECREF(words);
    return result;
}

/* pack_pages on the arguments (src, offsets, zero_dedup, flag, out) of zlib_pages and
 * lzo_pages, the buffers released after. */
static PyObject *pages_call(codec_t *cd, PyObject *args)
{
    Py_buffer src, offs, out;
    int zero_dedup;
    unsigned int flag;
    if (!PyArg_ParseTuple(args, "y*y*pIw*", &src, &offs, &zero_dedup, &flag, &out))
        return NULL;
    PyObject *result = pack_pages(cd, &src, &offs, zero_dedup, flag, &out);
    PyBuffer_Release(&src);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&out);
    return result;
}

/* zlib: one stream, reset per page, with compress2's parameters (makedumpfile -c). */
static size_t zlib_page(codec_t *cd, const uint8_t *pg, uint8_t *dst, long *err)
{
    z_stream *zs = cd->state;
    deflateReset(zs);
    zs->next_in = (Bytef *)pg;
    zs->avail_in = PAGE;
    zs->next_out = dst;
    zs->avail_out = PAGE; /* a stream that does not fit is stored raw anyway */
    int r = deflate(zs, Z_FINISH);
    if (r == Z_STREAM_END)
        return zs->total_out;
    if (r == Z_OK || r == Z_BUF_ERROR)
        return PAGE;
    *err = r;
    return (size_t)-1;
}

static void zlib_fail(codec_t *cd, long err)
{
    PyErr_Format(PyExc_RuntimeError, "zlib_pages: deflate failed (%ld)", err);
}

/* Our own level-1 deflate (_deflate1.c): the same bytes as zlib's, without its per-page
 * reset. Used when kz_selftest agreed with the linked zlib at import (own_deflate). */
typedef struct kz kz_t;
void kz_init(void);
kz_t *kz_new(void);
void kz_free(kz_t *z);
size_t kz_page(kz_t *z, const uint8_t *pg, uint8_t *dst);
int kz_selftest(void);
static int own_deflate;

static size_t kz_codec_page(codec_t *cd, const uint8_t *pg, uint8_t *dst, long *err)
{
    return kz_page(cd->state, pg, dst);
}

/*
 * zlib_pages(src, offsets, zero_dedup, flag, out[, engine]) -> (data_len, words)
 * Each page becomes one zlib stream at level 1 (see pack_pages for the rest). engine 1 is
 * our deflate, 0 zlib's; by default ours when it agreed with zlib at import.
 */
static PyObject *py_zlib_pages(PyObject *self, PyObject *args)
{
    Py_buffer src, offs, out;
    int zero_dedup, engine = -1;
    unsigned int flag;
    if (!PyArg_ParseTuple(args, "y*y*pIw*|i", &src, &offs, &zero_dedup, &flag, &out, &engine))
        return NULL;
    PyObject *result = NULL;
    if (engine == 1 || (engine == -1 && own_deflate)) {
        kz_t *z = kz_new();
        if (!z) {
            PyErr_NoMemory();
        } else {
            codec_t cd = {"zlib_pages", PAGE, kz_codec_page, zlib_fail, z};
            result = pack_pages(&cd, &src, &offs, zero_dedup, flag, &out);
            kz_free(z);
        }
    } else {
        z_stream zs;
        memset(&zs, 0, sizeof zs);
        if (deflateInit2(&zs, 1, Z_DEFLATED, MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
            PyErr_SetString(PyExc_MemoryError, "zlib_pages: deflateInit2 failed");
        } else {
            codec_t cd = {"zlib_pages", PAGE, zlib_page, zlib_fail, &zs};
            result = pack_pages(&cd, &src, &offs, zero_dedup, flag, &out);
            deflateEnd(&zs);
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&out);
    return result;
}

#ifdef HAVE_ZSTD
#define CCTX_NAME "kdump_capture._speedups.zstd_cctx"

static void cctx_free(PyObject *cap)
{
    ZSTD_freeCCtx(PyCapsule_GetPointer(cap, CCTX_NAME));
}

/*
 * zstd_cctx(level) -> capsule: one ZSTD_CCtx set to level, no checksum, the content size
 * in each frame header (python-zstandard's ZstdCompressor(level) frames, which crash's
 * ZSTD_decompressDCtx reads). Reused for every page; one per thread (not thread-safe).
 */
static PyObject *py_zstd_cctx(PyObject *self, PyObject *args)
{
    int level;
    if (!PyArg_ParseTuple(args, "i", &level))
        return NULL;
    ZSTD_CCtx *c = ZSTD_createCCtx();
    if (!c)
        return PyErr_NoMemory();
    if (ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0))) {
        ZSTD_freeCCtx(c);
        PyErr_Format(PyExc_ValueError, "zstd_cctx: level %d refused", level);
        return NULL;
    }
    PyObject *cap = PyCapsule_New(c, CCTX_NAME, cctx_free);
    if (!cap)
        ZSTD_freeCCtx(c);
    return cap;
}

/* A frame that does not fit in a page is stored raw anyway: capacity PAGE. */
static size_t zstd_page(codec_t *cd, const uint8_t *pg, uint8_t *dst, long *err)
{
    size_t r = ZSTD_compress2(cd->state, dst, PAGE, pg, PAGE);
    if (!ZSTD_isError(r))
        return r;
    if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall)
        return PAGE;
    *err = (long)ZSTD_getErrorCode(r);
    return (size_t)-1;
}

static void zstd_fail(codec_t *cd, long err)
{
    PyErr_Format(PyExc_RuntimeError, "zstd_pages: %s", ZSTD_getErrorString((ZSTD_ErrorCode)err));
}

/*
 * zstd_pages(cctx, src, offsets, zero_dedup, flag, out) -> (data_len, words)
 * As zlib_pages, with one zstd frame per page (ZSTD_compress2 on the reused context).
 */
static PyObject *py_zstd_pages(PyObject *self, PyObject *args)
{
    PyObject *cap;
    Py_buffer src, offs, out;
    int zero_dedup;
    unsigned int flag;
    if (!PyArg_ParseTuple(args, "Oy*y*pIw*", &cap, &src, &offs, &zero_dedup, &flag, &out))
        return NULL;
    PyObject *result = NULL;
    ZSTD_CCtx *c = PyCapsule_GetPointer(cap, CCTX_NAME);
    if (c) {
        codec_t cd = {"zstd_pages", PAGE, zstd_page, zstd_fail, c};
        result = pack_pages(&cd, &src, &offs, zero_dedup, flag, &out);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&out);
    return result;
}
#endif

#ifdef HAVE_LZO
/* lzo1x_1 output may exceed its input: lzo1x.h's bound for one page. */
#define LZO_PAGE_BOUND (PAGE + PAGE / 16 + 64 + 3)

static size_t lzo_page(codec_t *cd, const uint8_t *pg, uint8_t *dst, long *err)
{
    lzo_uint n = 0;
    int r = lzo1x_1_compress(pg, PAGE, dst, &n, cd->state);
    if (r == LZO_E_OK)
        return n;
    *err = r;
    return (size_t)-1;
}

static void lzo_fail(codec_t *cd, long err)
{
    PyErr_Format(PyExc_RuntimeError, "lzo_pages: lzo1x_1_compress failed (%ld)", err);
}

/*
 * lzo_pages(src, offsets, zero_dedup, flag, out) -> (data_len, words)
 * As zlib_pages, with raw lzo1x_1 output per page (makedumpfile -l; crash decodes it with
 * lzo1x_decompress_safe). The 128 KiB work memory is the call's own: thread-safe.
 */
static PyObject *py_lzo_pages(PyObject *self, PyObject *args)
{
    void *wrk = PyMem_RawMalloc(LZO1X_1_MEM_COMPRESS);
    if (!wrk)
        return PyErr_NoMemory();
    codec_t cd = {"lzo_pages", LZO_PAGE_BOUND, lzo_page, lzo_fail, wrk};
    PyObject *result = pages_call(&cd, args);
    PyMem_RawFree(wrk);
    return result;
}
#endif

/*
 * page_descs(words, data_pos, zero_off) -> bytes: struct page_desc[n] for words as
 * zlib_pages makes them: pages stored back to back from data_pos; a 0 word is the shared
 * zero page at zero_off.
 */
static PyObject *py_page_descs(PyObject *self, PyObject *args)
{
    Py_buffer wb;
    long long data_pos, zero_off;
    if (!PyArg_ParseTuple(args, "y*LL", &wb, &data_pos, &zero_off))
        return NULL;
    if (wb.len % 8) {
        PyBuffer_Release(&wb);
        PyErr_SetString(PyExc_ValueError, "page_descs: words must be u64");
        return NULL;
    }
    Py_ssize_t n = wb.len / 8;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 24);
    if (out) {
        uint8_t *d = (uint8_t *)PyBytes_AS_STRING(out);
        const uint64_t *w = wb.buf;
        int64_t pos = data_pos;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t doff;
            uint32_t size, flags;
            uint64_t zero64 = 0;
            if (w[i]) {
                doff = pos;
                size = (uint32_t)w[i];
                flags = (uint32_t)(w[i] >> 32);
                pos += size;
            } else {
                doff = zero_off;
                size = PAGE;
                flags = 0;
            }
            memcpy(d + i * 24, &doff, 8);
            memcpy(d + i * 24 + 8, &size, 4);
            memcpy(d + i * 24 + 12, &flags, 4);
            memcpy(d + i * 24 + 16, &zero64, 8);
        }
    }
    PyBuffer_Release(&wb);
    return out;
}

static PyMethodDef methods[] = {
    {"scan_window", py_scan_window, METH_VARARGS, "The struct-page walk over one window."},
    {"zero_pages", py_zero_pages, METH_VARARGS, "Bit mask of the all-zero pages of a buffer."},
    {"zlib_pages", py_zlib_pages, METH_VARARGS, "zlib level 1 per page: data and size words."},
#ifdef HAVE_ZSTD
    {"zstd_cctx", py_zstd_cctx, METH_VARARGS, "A zstd compression context for zstd_pages."},
    {"zstd_pages", py_zstd_pages, METH_VARARGS, "One zstd frame per page: data and size words."},
#endif
#ifdef HAVE_LZO
    {"lzo_pages", py_lzo_pages, METH_VARARGS, "lzo1x_1 per page: data and size words."},
#endif
    {"page_descs", py_page_descs, METH_VARARGS, "page_desc records from size words."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "Compiled per-page loops of kdump_capture.", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&module);
    kz_init();
    own_deflate = kz_selftest();
    /* Which deflate zlib_pages uses, and the zlib it was checked against */
    if (m && (PyModule_AddStringConstant(m, "ZLIB_DEFLATE", own_deflate ? "own" : "zlib") < 0 ||
              PyModule_AddStringConstant(m, "ZLIB_VERSION", zlibVersion()) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef HAVE_ZSTD
    /* The libzstd linked (tests compare bytes with python-zstandard when the versions match) */
    if (m && PyModule_AddIntConstant(m, "ZSTD_VERSION", (long)ZSTD_versionNumber()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
#ifdef HAVE_LZO
    if (m && (lzo_init() != LZO_E_OK ||
              PyModule_AddStringConstant(m, "LZO_VERSION", lzo_version_string()) < 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ImportError, "_speedups: lzo_init failed");
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
