/*
 * One 4 KiB page to a zlib stream at level 1, bit for bit what zlib's compress2(level 1)
 * gives (windowBits 15, memLevel 8, the default strategy: what makedumpfile -c calls).
 *
 * Why our own: zlib prepares each stream by clearing its 64 KiB hash table
 * (deflateReset), 16 times the page it then compresses, and moves every bit of the output
 * through a 16-bit buffer. Here the table is kept across pages and its entries carry the
 * page's generation (stale ones read as empty), the input is hashed in place, candidates
 * are compared 8 bytes at a time and each symbol's bits go out in one 8-byte store. What
 * decides the output is zlib's level-1 algorithm, followed step by step:
 *  - matching (deflate_fast): at each position the 3-byte hash chain is searched, newest
 *    first, for at most 4 candidates, stopping at a match of 8 bytes (nice length); a
 *    match of at most 4 bytes has each of its positions inserted into the hash chains, a
 *    longer one only its first. Bytes past the page read as zero (zlib zeroes its window
 *    there), and a match is cut at the end of the page.
 *  - one block for the page (a page has fewer symbols than zlib's symbol buffer), coded
 *    with whichever of stored, fixed or dynamic Huffman codes zlib's size estimate
 *    prefers; dynamic codes are built as zlib builds them (its heap order, ties broken by
 *    depth, and its way of shortening codes longer than 15 or 7 bits).
 * The format facts (RFC 1950/1951 code tables) are computed once by kz_init.
 *
 * kz_selftest compares this with the linked zlib on built-in pages: _speedups uses it only
 * when they agree, so a zlib whose level 1 differs (a patched or hardware deflate) keeps
 * its own output. tests/test_speedups.py compares every page of the real samples too.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define PAGE 4096
#define KZ_HBITS 15
#define KZ_HSIZE (1u << KZ_HBITS)
#define KZ_HMASK (KZ_HSIZE - 1)
#define KZ_POS_BITS 12 /* a position in the page */
#define KZ_POS_MASK ((1u << KZ_POS_BITS) - 1)
#define KZ_GENS 16 /* generations a hash entry tells apart (the 4 bits above the position) */
#define MIN_MATCH 3
#define MAX_MATCH 258
#define MAX_CHAIN 4 /* zlib's configuration of level 1 */
#define NICE_MATCH 8
#define MAX_INSERT 4
#define LITERALS 256
#define END_BLOCK 256
#define LENGTH_CODES 29
#define L_CODES (LITERALS + 1 + LENGTH_CODES)
#define D_CODES 30
#define BL_CODES 19
#define HEAP_SIZE (2 * L_CODES + 1)
#define MAX_BITS 15
#define MAX_BL_BITS 7
#define REP_3_6 16
#define REPZ_3_10 17
#define REPZ_11_138 18

static const uint8_t extra_lbits[LENGTH_CODES] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                                  2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint8_t extra_dbits[D_CODES] = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                             6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
static const uint8_t extra_blbits[BL_CODES] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                               0, 0, 0, 0, 0, 0, 2, 3, 7};
static const uint8_t bl_order[BL_CODES] = {16, 17, 18, 0, 8,  7, 9,  6, 10, 5,
                                           11, 4,  12, 3, 13, 2, 14, 1, 15};

/* Tables of the format, filled by kz_init. */
static uint8_t length_code[MAX_MATCH - MIN_MATCH + 1];
static uint16_t base_length[LENGTH_CODES];
static uint8_t dist_code[PAGE]; /* distance - 1 -> code, for distances within a page */
static uint16_t base_dist[D_CODES];
static uint16_t fixed_llen[L_CODES + 2], fixed_lcode[L_CODES + 2];
static uint16_t fixed_dlen[D_CODES], fixed_dcode[D_CODES];

/* A Huffman tree under construction: zlib's ct_data with its unions taken apart. */
typedef struct {
    uint16_t freq[HEAP_SIZE];
    uint16_t len[HEAP_SIZE + 1]; /* + the guard walk_tree sets past max_code */
    uint16_t dad[HEAP_SIZE];
    uint16_t code[HEAP_SIZE];
    int max_code;
} kz_tree_t;

struct kz {
    uint16_t head[KZ_HSIZE]; /* newest position of each hash | generation << 12 */
    uint16_t prev[PAGE];     /* the chain: the position inserted before, same hash */
    unsigned gen;
    uint8_t out[PAGE + 64]; /* the stream as it is written: room for whole 8-byte stores */
    uint8_t win[PAGE + MAX_MATCH + 8]; /* the page, then zeros */
    uint16_t sym_dist[PAGE];           /* 0 for a literal */
    uint16_t sym_lc[PAGE];             /* the literal, or match length - 3 */
    int nsym;
    kz_tree_t lt, dt, bt;
    int heap[HEAP_SIZE], heap_max; /* the nodes of the last tree built, root first */
    uint16_t bl_count[MAX_BITS + 1];
    unsigned long opt_len, static_len;
};

typedef struct kz kz_t;

static uint8_t rev8[256]; /* the bits of a byte in reverse order (kz_init) */

/* The len low bits of code, reversed (deflate sends Huffman codes first bit first). */
static inline unsigned bi_reverse(unsigned code, int len)
{
    return ((unsigned)rev8[code & 255] << 8 | rev8[code >> 8 & 255]) >> (16 - len);
}

/* Canonical codes for the lengths len[0..max_code] (count[b]: codes of b bits). */
static void gen_codes(uint16_t *code, const uint16_t *len, int max_code, const uint16_t *count)
{
    uint16_t next[MAX_BITS + 1];
    unsigned c = 0;
    for (int bits = 1; bits <= MAX_BITS; bits++) {
        c = (c + count[bits - 1]) << 1;
        next[bits] = (uint16_t)c;
    }
    for (int n = 0; n <= max_code; n++)
        if (len[n])
            code[n] = (uint16_t)bi_reverse(next[len[n]]++, len[n]);
}

void kz_init(void)
{
    int length = 0, code, n;
    for (n = 0; n < 256; n++) {
        unsigned r = 0;
        for (int bit = 0; bit < 8; bit++)
            r |= (n >> bit & 1u) << (7 - bit);
        rev8[n] = (uint8_t)r;
    }
    for (code = 0; code < LENGTH_CODES - 1; code++) {
        base_length[code] = (uint16_t)length;
        for (n = 0; n < (1 << extra_lbits[code]); n++)
            length_code[length++] = (uint8_t)code;
    }
    /* Length 258 has two codes (284 with 5 extra bits, or 285): zlib sends 285, which has
     * no extra bits (its base is 258, so the extra value compress_block adds is 0). */
    length_code[length - 1] = (uint8_t)code;
    base_length[LENGTH_CODES - 1] = MAX_MATCH - MIN_MATCH;
    int dist = 0;
    for (code = 0; code < D_CODES; code++) {
        base_dist[code] = (uint16_t)dist;
        for (n = 0; n < (1 << extra_dbits[code]); n++, dist++)
            if (dist < PAGE)
                dist_code[dist] = (uint8_t)code;
    }
    uint16_t count[MAX_BITS + 1] = {0};
    for (n = 0; n < L_CODES + 2; n++) {
        fixed_llen[n] = n <= 143 ? 8 : n <= 255 ? 9 : n <= 279 ? 7 : 8;
        count[fixed_llen[n]]++;
    }
    gen_codes(fixed_lcode, fixed_llen, L_CODES + 1, count);
    for (n = 0; n < D_CODES; n++) {
        fixed_dlen[n] = 5;
        fixed_dcode[n] = (uint16_t)bi_reverse((unsigned)n, 5);
    }
}

kz_t *kz_new(void)
{
    kz_t *z = calloc(1, sizeof *z);
    if (z)
        z->gen = 1; /* all entries are generation 0: empty */
    return z;
}

void kz_free(kz_t *z) { free(z); }

/* ---- matching (zlib's deflate_fast and longest_match at level 1) ---- */

static inline unsigned hash3(const uint8_t *p)
{
    return (((unsigned)p[0] << 10) ^ ((unsigned)p[1] << 5) ^ p[2]) & KZ_HMASK;
}

/* Inserts position s; returns the previous newest position of its hash (0: none). */
static inline unsigned insert(kz_t *z, unsigned s, unsigned tag)
{
    unsigned h = hash3(z->win + s);
    unsigned e = z->head[h];
    unsigned older = (e & ~KZ_POS_MASK) == tag ? e & KZ_POS_MASK : 0;
    z->prev[s] = (uint16_t)older;
    z->head[h] = (uint16_t)(s | tag);
    return older;
}

/* How far a and b agree from index from on, at most to. */
static inline unsigned common(const uint8_t *a, const uint8_t *b, unsigned from, unsigned to)
{
    unsigned n = from;
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n + 8 <= to) { /* 8 bytes a step: the lowest differing byte is the first */
        uint64_t x, y;
        memcpy(&x, a + n, 8);
        memcpy(&y, b + n, 8);
        if (x != y)
            return n + (unsigned)(__builtin_ctzll(x ^ y) >> 3);
        n += 8;
    }
#endif
    while (n < to && a[n] == b[n])
        n++;
    return n;
}

/* Which of the 8 bytes loaded into x and y first differs (x != y): the lowest in memory. */
static inline unsigned first_difference(uint64_t x, uint64_t y)
{
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (unsigned)__builtin_ctzll(x ^ y) >> 3;
#elif defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return (unsigned)__builtin_clzll(x ^ y) >> 3;
#else
    unsigned n = 0;
    uint8_t a[8], b[8];
    memcpy(a, &x, 8);
    memcpy(b, &y, 8);
    while (a[n] == b[n])
        n++;
    return n;
#endif
}

/* The longest match for position s among its chain from cur (match start in *start).
 * zlib skips a candidate whose bytes 0, 1, best - 1 or best differ from the scan's, which
 * is to say whose match is no longer than the best so far; here the first 8 bytes of both
 * are compared at once, and a candidate is taken when its match is longer, as in zlib. */
static unsigned longest_match(const kz_t *z, unsigned s, unsigned cur, unsigned lookahead,
                              unsigned *start)
{
    const uint8_t *scan = z->win + s;
    unsigned chain = MAX_CHAIN;
    unsigned best = MIN_MATCH - 1;
    unsigned nice = NICE_MATCH < lookahead ? NICE_MATCH : lookahead;
    uint64_t head;
    memcpy(&head, scan, 8);
    do {
        const uint8_t *m = z->win + cur;
        uint64_t x;
        memcpy(&x, m, 8);
        unsigned len;
        if (x != head)
            len = first_difference(x, head);
        else
            len = common(scan, m, 8, MAX_MATCH);
        if (len > best) {
            *start = cur;
            best = len;
            if (len >= nice)
                break;
        }
    } while ((cur = z->prev[cur]) != 0 && --chain != 0);
    return best <= lookahead ? best : lookahead;
}

static inline void tally_lit(kz_t *z, unsigned c)
{
    z->sym_dist[z->nsym] = 0;
    z->sym_lc[z->nsym++] = (uint16_t)c;
    z->lt.freq[c]++;
}

static inline void tally_dist(kz_t *z, unsigned dist, unsigned lc)
{
    z->sym_dist[z->nsym] = (uint16_t)dist;
    z->sym_lc[z->nsym++] = (uint16_t)lc;
    z->lt.freq[length_code[lc] + LITERALS + 1]++;
    z->dt.freq[dist_code[dist - 1]]++;
}

static void find_matches(kz_t *z)
{
    unsigned tag = z->gen << KZ_POS_BITS;
    unsigned s = 0, lookahead = PAGE, start = 0;
    while (lookahead) {
        unsigned head = lookahead >= MIN_MATCH ? insert(z, s, tag) : 0;
        unsigned len = head ? longest_match(z, s, head, lookahead, &start) : 0;
        if (len >= MIN_MATCH) {
            tally_dist(z, s - start, len - MIN_MATCH);
            lookahead -= len;
            if (len <= MAX_INSERT && lookahead >= MIN_MATCH) {
                while (--len)
                    insert(z, ++s, tag);
                s++;
            } else {
                s += len;
            }
        } else {
            tally_lit(z, z->win[s]);
            lookahead--;
            s++;
        }
    }
}

/* ---- Huffman trees (zlib's build_tree, gen_bitlen) ---- */

/*
 * zlib's priority queue orders nodes by frequency, then depth (the smaller first, the one
 * deeper in the heap on a tie). An entry here is freq << 18 | depth << 10 | node, so that
 * order is one comparison of entry >> 10. Frequencies stay below 2^14 (a page has at most
 * 4097 symbols), depths below 2^8, nodes below 2^10.
 */
#define KEY(e) ((e) >> 10)
#define NODE(e) ((int)((e) & 1023))

static void pqdownheap(uint32_t *q, int len, int k)
{
    uint32_t v = q[k];
    int j = k << 1;
    while (j <= len) {
        if (j < len && KEY(q[j + 1]) <= KEY(q[j]))
            j++;
        if (KEY(v) <= KEY(q[j]))
            break;
        q[k] = q[j];
        k = j;
        j <<= 1;
    }
    q[k] = v;
}

/*
 * pqdownheap(q, len, 1) for a root that sinks far, as the last entry moved to the root
 * does: the hole goes down to a leaf along the smaller children, one comparison a level,
 * and the entry climbs back while it is no larger than what is above the hole. The path
 * is the one pqdownheap takes and its keys only grow along it, so the entry lands where
 * pqdownheap would put it (Floyd's bottom-up sift).
 */
static void pqsift_root(uint32_t *q, int len)
{
    uint32_t v = q[1];
    int k = 1, j = 2;
    while (j <= len) { /* q[len + 1] is the largest key: a missing right child never wins */
        j += KEY(q[j + 1]) <= KEY(q[j]);
        q[k] = q[j];
        k = j;
        j <<= 1;
    }
    while (KEY(v) <= KEY(q[k >> 1])) { /* q[0] is 0, below every entry: stops at the root */
        q[k] = q[k >> 1];
        k >>= 1;
    }
    q[k] = v;
}

/* Code lengths from the finished tree, at most max_length bits (opt_len, static_len too). */
static void gen_bitlen(kz_t *z, kz_tree_t *t, const uint16_t *slen, const uint8_t *extra, int base,
                       int max_length)
{
    int h, n, m, bits, overflow = 0;
    for (bits = 0; bits <= MAX_BITS; bits++)
        z->bl_count[bits] = 0;
    t->len[z->heap[z->heap_max]] = 0; /* the root */
    for (h = z->heap_max + 1; h < HEAP_SIZE; h++) {
        n = z->heap[h];
        bits = t->len[t->dad[n]] + 1;
        if (bits > max_length)
            bits = max_length, overflow++;
        t->len[n] = (uint16_t)bits;
        if (n > t->max_code)
            continue; /* not a leaf */
        z->bl_count[bits]++;
        int xbits = n >= base ? extra[n - base] : 0;
        unsigned long f = t->freq[n];
        z->opt_len += f * (unsigned)(bits + xbits);
        if (slen)
            z->static_len += f * (unsigned)(slen[n] + xbits);
    }
    if (overflow == 0)
        return;
    do {
        bits = max_length - 1;
        while (z->bl_count[bits] == 0)
            bits--;
        z->bl_count[bits]--;
        z->bl_count[bits + 1] += 2;
        z->bl_count[max_length]--;
        overflow -= 2;
    } while (overflow > 0);
    for (bits = max_length; bits != 0; bits--) {
        n = z->bl_count[bits];
        while (n != 0) {
            m = z->heap[--h];
            if (m > t->max_code)
                continue;
            if (t->len[m] != (unsigned)bits) {
                z->opt_len += ((unsigned long)bits - t->len[m]) * t->freq[m];
                t->len[m] = (uint16_t)bits;
            }
            n--;
        }
    }
}

static void build_tree(kz_t *z, kz_tree_t *t, int elems, const uint16_t *slen,
                       const uint8_t *extra, int base, int max_length)
{
    uint32_t q[HEAP_SIZE + 1];
    int n, len = 0, max_code = -1, node;
    q[0] = 0;
    for (n = 0; n < elems; n++) {
        if (t->freq[n])
            q[++len] = (uint32_t)t->freq[n] << 18 | (uint32_t)(max_code = n);
        else
            t->len[n] = 0;
    }
    /* Deflate wants two codes at least: zlib adds codes 0 or 1 with a frequency of 1. */
    while (len < 2) {
        node = max_code < 2 ? ++max_code : 0;
        q[++len] = 1u << 18 | (uint32_t)node;
        t->freq[node] = 1;
        z->opt_len--;
        if (slen)
            z->static_len -= slen[node];
    }
    t->max_code = max_code;
    q[len + 1] = UINT32_MAX;
    for (n = len / 2; n >= 1; n--)
        pqdownheap(q, len, n);
    /* Merge the two smallest until one is left; z->heap[heap_max..] gets the nodes, the
     * root first, each before its children (zlib keeps them at the end of its heap). */
    z->heap_max = HEAP_SIZE;
    node = elems;
    do {
        uint32_t a = q[1];
        q[1] = q[len];
        q[len--] = UINT32_MAX;
        pqsift_root(q, len);
        uint32_t b = q[1];
        z->heap[--z->heap_max] = NODE(a);
        z->heap[--z->heap_max] = NODE(b);
        uint32_t da = a >> 10 & 255, db = b >> 10 & 255;
        uint32_t depth = (da >= db ? da : db) + 1;
        t->dad[NODE(a)] = t->dad[NODE(b)] = (uint16_t)node;
        q[1] = ((a >> 18) + (b >> 18)) << 18 | depth << 10 | (uint32_t)node++;
        pqsift_root(q, len);
    } while (len >= 2);
    z->heap[--z->heap_max] = NODE(q[1]);
    gen_bitlen(z, t, slen, extra, base, max_length);
    gen_codes(t->code, t->len, max_code, z->bl_count);
}

/* ---- output ---- */

typedef struct {
    uint8_t *o, *limit; /* limit: past it the stream no longer fits a page */
    uint64_t acc;       /* bits not yet stored, the first in the lowest bit */
    unsigned n;         /* how many: at most 7 between symbols */
} bits_t;

/* Adds bits to the accumulator; a symbol's codes (at most 48 bits) then one store. */
static inline void put(bits_t *b, unsigned value, unsigned len)
{
    b->acc |= (uint64_t)value << b->n;
    b->n += len;
}

/* Stores the whole bytes of the accumulator: 8 bytes written, the whole ones kept. */
static inline void store(bits_t *b)
{
    uint64_t a = b->acc;
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(b->o, &a, 8);
#else
    for (int i = 0; i < 8; i++)
        b->o[i] = (uint8_t)(a >> 8 * i);
#endif
    unsigned whole = b->n >> 3;
    b->o += whole;
    b->acc = a >> 8 * whole;
    b->n &= 7;
}

/* put then store: for the header and the code lengths, a few bits at a time. */
static inline void put_store(bits_t *b, unsigned value, unsigned len)
{
    put(b, value, len);
    store(b);
}

/* One code-length code: counted in the code-length tree (b NULL) or sent. */
static inline void bl_code(kz_t *z, bits_t *b, int sym)
{
    if (b)
        put_store(b, z->bt.code[sym], z->bt.len[sym]);
    else
        z->bt.freq[sym]++;
}

/*
 * The code lengths of tree t as runs of code-length codes (zlib's scan_tree and
 * send_tree): with b NULL they are counted, to build the code-length tree; else sent.
 */
static void walk_tree(kz_t *z, kz_tree_t *t, bits_t *b)
{
    int prevlen = -1, curlen, nextlen = t->len[0], count = 0, max_count = 7, min_count = 4;
    if (nextlen == 0)
        max_count = 138, min_count = 3;
    t->len[t->max_code + 1] = 0xffff; /* guard */
    for (int n = 0; n <= t->max_code; n++) {
        curlen = nextlen;
        nextlen = t->len[n + 1];
        if (++count < max_count && curlen == nextlen)
            continue;
        else if (count < min_count) {
            do
                bl_code(z, b, curlen);
            while (--count != 0);
        } else if (curlen != 0) {
            if (curlen != prevlen) {
                bl_code(z, b, curlen);
                count--;
            }
            bl_code(z, b, REP_3_6);
            if (b)
                put_store(b, (unsigned)count - 3, 2);
        } else if (count <= 10) {
            bl_code(z, b, REPZ_3_10);
            if (b)
                put_store(b, (unsigned)count - 3, 3);
        } else {
            bl_code(z, b, REPZ_11_138);
            if (b)
                put_store(b, (unsigned)count - 11, 7);
        }
        count = 0;
        prevlen = curlen;
        if (nextlen == 0)
            max_count = 138, min_count = 3;
        else if (curlen == nextlen)
            max_count = 6, min_count = 3;
        else
            max_count = 7, min_count = 4;
    }
}

/* The symbols of the page in codes; 0, or 1 when the stream passed b->limit. */
static int compress_block(const kz_t *z, bits_t *b, const uint16_t *lcode, const uint16_t *llen,
                          const uint16_t *dcode, const uint16_t *dlen)
{
    for (int i = 0; i < z->nsym; i++) {
        unsigned dist = z->sym_dist[i], lc = z->sym_lc[i];
        if (dist == 0) {
            put(b, lcode[lc], llen[lc]);
        } else {
            unsigned code = length_code[lc];
            put(b, lcode[code + LITERALS + 1], llen[code + LITERALS + 1]);
            put(b, lc - base_length[code], extra_lbits[code]);
            dist--;
            code = dist_code[dist];
            put(b, dcode[code], dlen[code]);
            put(b, dist - base_dist[code], extra_dbits[code]);
        }
        store(b);
        if (b->o > b->limit)
            return 1;
    }
    put_store(b, lcode[END_BLOCK], llen[END_BLOCK]);
    return 0;
}

/* The Adler-32 of a page (RFC 1950), as zlib's adler32(1, pg, PAGE) gives it. */
static uint32_t adler_page(const uint8_t *pg)
{
#ifdef __SSE2__
    /* 16 bytes a step: s1 gains their sum, s2 gains 16 * s1 before them plus the bytes
     * weighted 16..1. No lane can overflow within one page (s2 < 2^31 for 4096 bytes). */
    const __m128i zero = _mm_setzero_si128();
    const __m128i w_lo = _mm_setr_epi16(16, 15, 14, 13, 12, 11, 10, 9);
    const __m128i w_hi = _mm_setr_epi16(8, 7, 6, 5, 4, 3, 2, 1);
    __m128i vs1 = zero, vprev = zero, vs2 = zero;
    for (int i = 0; i < PAGE; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(pg + i));
        vprev = _mm_add_epi64(vprev, vs1);
        vs1 = _mm_add_epi64(vs1, _mm_sad_epu8(x, zero));
        vs2 = _mm_add_epi32(vs2, _mm_madd_epi16(_mm_unpacklo_epi8(x, zero), w_lo));
        vs2 = _mm_add_epi32(vs2, _mm_madd_epi16(_mm_unpackhi_epi8(x, zero), w_hi));
    }
    uint64_t l1[2], lp[2];
    uint32_t l2[4];
    _mm_storeu_si128((__m128i *)l1, vs1);
    _mm_storeu_si128((__m128i *)lp, vprev);
    _mm_storeu_si128((__m128i *)l2, vs2);
    uint64_t s1 = 1 + l1[0] + l1[1];
    uint64_t s2 = PAGE + 16 * (lp[0] + lp[1]) + l2[0] + l2[1] + l2[2] + l2[3];
    return (uint32_t)((s2 % 65521) << 16 | (s1 % 65521));
#else
    return (uint32_t)adler32(adler32(0L, Z_NULL, 0), pg, PAGE);
#endif
}

/*
 * The zlib stream of the page pg into dst (room for PAGE bytes): its size, or PAGE when it
 * would take PAGE bytes or more (the caller stores the page raw then, as zlib's caller
 * does when the stream does not fit).
 */
size_t kz_page(kz_t *z, const uint8_t *pg, uint8_t *dst)
{
    memcpy(z->win, pg, PAGE); /* the bytes after it stay zero */
    if (++z->gen == KZ_GENS) {
        memset(z->head, 0, sizeof z->head);
        z->gen = 1;
    }
    memset(z->lt.freq, 0, L_CODES * sizeof z->lt.freq[0]);
    memset(z->dt.freq, 0, D_CODES * sizeof z->dt.freq[0]);
    memset(z->bt.freq, 0, BL_CODES * sizeof z->bt.freq[0]);
    z->lt.freq[END_BLOCK] = 1;
    z->opt_len = z->static_len = 0;
    z->nsym = 0;
    find_matches(z);

    build_tree(z, &z->lt, L_CODES, fixed_llen, extra_lbits, LITERALS + 1, MAX_BITS);
    build_tree(z, &z->dt, D_CODES, fixed_dlen, extra_dbits, 0, MAX_BITS);
    walk_tree(z, &z->lt, NULL);
    walk_tree(z, &z->dt, NULL);
    build_tree(z, &z->bt, BL_CODES, NULL, extra_blbits, 0, MAX_BL_BITS);
    int max_blindex;
    for (max_blindex = BL_CODES - 1; max_blindex >= 3; max_blindex--)
        if (z->bt.len[bl_order[max_blindex]] != 0)
            break;
    z->opt_len += 3 * ((unsigned long)max_blindex + 1) + 5 + 5 + 4;
    unsigned long opt_lenb = (z->opt_len + 3 + 7) >> 3;
    unsigned long static_lenb = (z->static_len + 3 + 7) >> 3;
    if (static_lenb <= opt_lenb)
        opt_lenb = static_lenb;
    /* zlib header (2 bytes), the block, adler32 (4): a stored block never fits a page */
    if (PAGE + 4 <= opt_lenb || 2 + opt_lenb + 4 >= PAGE)
        return PAGE;

    /* Past PAGE - 5 bytes of header and codes, the stream with its Adler-32 (4) takes a
     * page or more: the page is stored raw. Below that the size decides, exactly. A store
     * writes 8 bytes from at most there, plus a symbol's 6: z->out has the room. */
    bits_t b = {z->out + 2, z->out + PAGE - 5, 0, 0};
    int full;
    if (static_lenb == opt_lenb) {
        put_store(&b, (1 << 1) + 1, 3); /* fixed codes, last block */
        full = compress_block(z, &b, fixed_lcode, fixed_llen, fixed_dcode, fixed_dlen);
    } else {
        put_store(&b, (2 << 1) + 1, 3); /* dynamic codes, last block */
        put_store(&b, (unsigned)(z->lt.max_code + 1 - 257), 5);
        put_store(&b, (unsigned)(z->dt.max_code + 1 - 1), 5);
        put_store(&b, (unsigned)(max_blindex + 1 - 4), 4);
        for (int rank = 0; rank <= max_blindex; rank++)
            put_store(&b, z->bt.len[bl_order[rank]], 3);
        walk_tree(z, &z->lt, &b);
        walk_tree(z, &z->dt, &b);
        full = compress_block(z, &b, z->lt.code, z->lt.len, z->dt.code, z->dt.len);
    }
    if (full)
        return PAGE;
    if (b.n > 0) /* the bits left, to a byte boundary (store wrote them already) */
        b.o++;
    size_t size = (size_t)(b.o - z->out) + 4;
    if (size >= PAGE)
        return PAGE;
    uint32_t a = adler_page(pg);
    z->out[0] = 0x78, z->out[1] = 0x01; /* deflate, 32 KiB window, level flag 0 (fastest) */
    b.o[0] = (uint8_t)(a >> 24), b.o[1] = (uint8_t)(a >> 16), b.o[2] = (uint8_t)(a >> 8),
    b.o[3] = (uint8_t)a;
    memcpy(dst, z->out, size);
    return size;
}

/* ---- the check against the linked zlib ---- */

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

/* Test page number k (0..KZ_TEST_PAGES-1): text, skewed bytes, pointers, runs, sparse. */
static void test_page(int k, uint8_t *p)
{
    uint32_t s = 0x9e3779b9u * (uint32_t)(k + 1);
    static const char *words[] = {"kernel ", "panic ", "page ", "dump ", "the ", "of ",
                                  "\n", "0x", "ffff8880", "00000000 ", "vmcore ", "crash "};
    size_t i = 0;
    switch (k % 6) {
    case 0: /* text */
        while (i < PAGE) {
            const char *w = words[lcg(&s) % 12];
            while (*w && i < PAGE)
                p[i++] = (uint8_t)*w++;
        }
        break;
    case 1: /* bytes of very unequal frequency: long codes, the length limit */
        for (i = 0; i < PAGE; i++) {
            uint32_t r = lcg(&s) % 4181, f0 = 0, f1 = 1, c = 0;
            while (r >= f1 && c < 18)
                r -= f1, f1 += f0, f0 = f1 - f0, c++;
            p[i] = (uint8_t)(c * 13 + k);
        }
        break;
    case 2: /* 64-bit pointers and small counters */
        for (i = 0; i < PAGE; i += 8) {
            uint64_t v = lcg(&s) % 3 ? 0xffff888000000000ull | (lcg(&s) % 4096) << 6 : lcg(&s) % 8;
            memcpy(p + i, &v, 8);
        }
        break;
    case 3: /* long runs and repeats, with changes */
        for (i = 0; i < PAGE; i++)
            p[i] = i % (7 + k) == 0 && lcg(&s) % 50 == 0 ? (uint8_t)lcg(&s) : (uint8_t)"abcdefgh"[i % 7];
        break;
    case 4: /* a few bytes in zeros */
        memset(p, 0, PAGE);
        for (i = 0; i < 40; i++)
            p[lcg(&s) % PAGE] = (uint8_t)lcg(&s);
        break;
    default: /* noise: does not compress */
        for (i = 0; i < PAGE; i++)
            p[i] = (uint8_t)lcg(&s);
    }
}

#define KZ_TEST_PAGES 24

/* 1 when kz_page gives what this zlib's compress2 at level 1 gives on the test pages. */
int kz_selftest(void)
{
    kz_t *z = kz_new();
    uint8_t *page = malloc(PAGE), *ours = malloc(PAGE), *theirs = malloc(compressBound(PAGE));
    int ok = z && page && ours && theirs;
    for (int k = 0; ok && k < KZ_TEST_PAGES; k++) {
        test_page(k, page);
        uLongf size = compressBound(PAGE);
        if (compress2(theirs, &size, page, PAGE, 1) != Z_OK) {
            ok = 0;
            break;
        }
        size_t got = kz_page(z, page, ours);
        if (size >= PAGE)
            ok = got == PAGE;
        else
            ok = got == size && memcmp(ours, theirs, size) == 0;
    }
    free(page), free(ours), free(theirs);
    kz_free(z);
    return ok;
}
