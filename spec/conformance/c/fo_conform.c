/* fo_conform: an implementation of fisheropt's five update rules in C11, written from the
 * spec pages alone, checked against the golden vectors (spec/vectors/<suite>.json).
 *
 *   cc -std=c11 -O2 -ffp-contract=off -o fo_conform fo_conform.c -lm
 *   ./fo_conform [--margins] ../../vectors/adam.json ../../vectors/adamw.json \
 *                ../../vectors/coupled_adam.json ../../vectors/fadam.json ../../vectors/lion.json
 *
 * It reads the vector format of spec/vectors.md (format version 2) with the small JSON
 * reader below, runs every "optimizer" case of the functions adam_step, adamw_step,
 * fadam_step, coupled_adam_step and lion_step (other cases are counted as skipped: a
 * rule this runner does not implement shows as skipped cases), and compares
 * params and state after every step with the per-array tolerances. It prints one line per
 * failing case and one summary line per file, "<suite>: P/N cases passed (S skipped)", and
 * exits with status 1 when a case fails, 2 on a read error. --margins also prints, per file,
 * the largest ratio |actual − expected| / allowed met in a passing comparison.
 *
 * -DMUTANT_NO_THETA_UPDATE builds a deliberately wrong variant (θ is never written), which
 * must fail: tests/test_conformance_c.py checks both.
 *
 * No dependencies beyond the C standard library. Numbers are parsed with strtod (as double,
 * then converted: float32 values are exact in double; never strtof, see spec/vectors.md).
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================= JSON reader */
enum { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct J J;
struct J {
    int type;
    double num;
    char *str;      /* J_STR: the decoded string */
    int n;          /* J_ARR, J_OBJ: number of children */
    J **kid;        /* children */
    char **key;     /* J_OBJ: their keys */
};

typedef struct {
    const char *p, *end;
    const char *err;
} Parser;

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static void *xrealloc(void *q, size_t n)
{
    void *p = realloc(q, n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static void skip_ws(Parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\n' || *ps->p == '\r' || *ps->p == '\t'))
        ps->p++;
}

static J *parse_value(Parser *ps);

static char *parse_string(Parser *ps)
{
    /* ps->p at the opening quote; escapes decoded (\uXXXX as UTF-8, surrogates as '?') */
    size_t cap = 16, len = 0;
    char *out = xmalloc(cap);
    ps->p++;
    while (ps->p < ps->end && *ps->p != '"') {
        unsigned char ch = (unsigned char)*ps->p++;
        char buf[4];
        int nb = 1;
        buf[0] = (char)ch;
        if (ch == '\\' && ps->p < ps->end) {
            char e = *ps->p++;
            switch (e) {
            case 'n': buf[0] = '\n'; break;
            case 't': buf[0] = '\t'; break;
            case 'r': buf[0] = '\r'; break;
            case 'b': buf[0] = '\b'; break;
            case 'f': buf[0] = '\f'; break;
            case 'u': {
                unsigned cp = 0;
                for (int k = 0; k < 4 && ps->p < ps->end; ++k) {
                    char hc = *ps->p++;
                    cp = cp * 16 + (unsigned)(hc >= 'a' ? hc - 'a' + 10 : hc >= 'A' ? hc - 'A' + 10 : hc - '0');
                }
                if (cp < 0x80) {
                    buf[0] = (char)cp;
                } else if (cp < 0x800) {
                    buf[0] = (char)(0xC0 | (cp >> 6)); buf[1] = (char)(0x80 | (cp & 0x3F)); nb = 2;
                } else if (cp >= 0xD800 && cp < 0xE000) {
                    buf[0] = '?';
                } else {
                    buf[0] = (char)(0xE0 | (cp >> 12)); buf[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
                    buf[2] = (char)(0x80 | (cp & 0x3F)); nb = 3;
                }
                break;
            }
            default: buf[0] = e; break;   /* \" \\ \/ */
            }
        }
        if (len + (size_t)nb + 1 > cap) {
            cap *= 2;
            out = xrealloc(out, cap);
        }
        memcpy(out + len, buf, (size_t)nb);
        len += (size_t)nb;
    }
    if (ps->p >= ps->end) {
        ps->err = "unterminated string";
        out[len] = 0;
        return out;
    }
    ps->p++;
    out[len] = 0;
    return out;
}

static J *new_node(int type)
{
    J *j = xmalloc(sizeof *j);
    memset(j, 0, sizeof *j);
    j->type = type;
    return j;
}

static J *parse_container(Parser *ps, int obj)
{
    J *j = new_node(obj ? J_OBJ : J_ARR);
    int cap = 0;
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == (obj ? '}' : ']')) {
        ps->p++;
        return j;
    }
    for (;;) {
        char *key = NULL;
        skip_ws(ps);
        if (obj) {
            if (ps->p >= ps->end || *ps->p != '"') {
                ps->err = "expected a key";
                return j;
            }
            key = parse_string(ps);
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                ps->err = "expected ':'";
                free(key);
                return j;
            }
            ps->p++;
        }
        J *v = parse_value(ps);
        if (j->n == cap) {
            cap = cap ? 2 * cap : 8;
            j->kid = xrealloc(j->kid, sizeof(J *) * (size_t)cap);
            if (obj)
                j->key = xrealloc(j->key, sizeof(char *) * (size_t)cap);
        }
        j->kid[j->n] = v;
        if (obj)
            j->key[j->n] = key;
        j->n++;
        if (ps->err)
            return j;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == (obj ? '}' : ']')) {
            ps->p++;
            return j;
        }
        ps->err = obj ? "expected ',' or '}'" : "expected ',' or ']'";
        return j;
    }
}

static J *parse_value(Parser *ps)
{
    skip_ws(ps);
    if (ps->p >= ps->end) {
        ps->err = "unexpected end of input";
        return new_node(J_NULL);
    }
    char c = *ps->p;
    if (c == '{' || c == '[')
        return parse_container(ps, c == '{');
    if (c == '"') {
        J *j = new_node(J_STR);
        j->str = parse_string(ps);
        return j;
    }
    if (!strncmp(ps->p, "true", 4)) { ps->p += 4; return new_node(J_TRUE); }
    if (!strncmp(ps->p, "false", 5)) { ps->p += 5; return new_node(J_FALSE); }
    if (!strncmp(ps->p, "null", 4)) { ps->p += 4; return new_node(J_NULL); }
    /* a number: strtod reads every JSON number; ERANGE on a subnormal is not an error here */
    char *stop;
    J *j = new_node(J_NUM);
    errno = 0;
    j->num = strtod(ps->p, &stop);
    if (stop == ps->p)
        ps->err = "unexpected character";
    ps->p = stop;
    return j;
}

static void free_json(J *j)
{
    if (!j)
        return;
    for (int i = 0; i < j->n; ++i) {
        free_json(j->kid[i]);
        if (j->key)
            free(j->key[i]);
    }
    free(j->kid);
    free(j->key);
    free(j->str);
    free(j);
}

static J *get(const J *obj, const char *key)
{
    if (!obj || obj->type != J_OBJ)
        return NULL;
    for (int i = 0; i < obj->n; ++i)
        if (!strcmp(obj->key[i], key))
            return obj->kid[i];
    return NULL;
}

static J *at(const J *arr, int i)
{
    return arr && arr->type == J_ARR && i >= 0 && i < arr->n ? arr->kid[i] : NULL;
}

/* A JSON number, or one of the strings "nan", "inf", "-inf". */
static double number(const J *j)
{
    if (!j)
        return NAN;
    if (j->type == J_NUM)
        return j->num;
    if (j->type == J_STR) {
        if (!strcmp(j->str, "inf"))
            return INFINITY;
        if (!strcmp(j->str, "-inf"))
            return -INFINITY;
        return NAN;
    }
    return NAN;
}

/* ======================================================================= arrays */
typedef struct {
    int f32;        /* 1: float32, 0: float64 */
    int ndim;
    long shape[8];
    long n;
    void *data;     /* float* or double* */
} Array;

/* as_double: keep the values as double whatever the dtype (expected values: a float32 value is
 * exact in double, and a double stays a normal number where a float32 one is subnormal, so the
 * comparison does not depend on the floating-point mode the code under test was built with). */
static int read_array_as(const J *j, Array *a, int as_double)
{
    const J *dt = get(j, "dtype"), *shape = get(j, "shape"), *data = get(j, "data");
    memset(a, 0, sizeof *a);
    if (!dt || dt->type != J_STR || !shape || shape->type != J_ARR || !data || data->type != J_ARR)
        return 0;
    if (!strcmp(dt->str, "float32"))
        a->f32 = 1;
    else if (strcmp(dt->str, "float64"))
        return 0;
    a->ndim = shape->n;
    a->n = 1;
    for (int i = 0; i < shape->n && i < 8; ++i) {
        a->shape[i] = (long)number(shape->kid[i]);
        a->n *= a->shape[i];
    }
    if (a->n != data->n)
        return 0;
    const int store_f32 = a->f32 && !as_double;
    a->data = xmalloc((size_t)a->n * (store_f32 ? sizeof(float) : sizeof(double)));
    for (long i = 0; i < a->n; ++i) {
        const double x = number(data->kid[i]);            /* parse as double ... */
        if (store_f32)
            ((float *)a->data)[i] = (float)x;              /* ... then convert (exact) */
        else
            ((double *)a->data)[i] = x;
    }
    if (as_double)
        a->f32 = a->f32 ? 2 : 0;                           /* 2: float32 values held as double */
    return 1;
}

static int read_array(const J *j, Array *a)
{
    return read_array_as(j, a, 0);
}

static double elem(const Array *a, long i)
{
    return a->f32 == 1 ? (double)((const float *)a->data)[i] : ((const double *)a->data)[i];
}

/* ======================================================================= the rules */
typedef struct {
    double lr, beta1, beta2, eps, weight_decay, eps2, clip, p;
} Hyper;

#define T float
#define SFX f32
#define SQRT sqrtf
#define POW powf
#define TMIN FLT_MIN
#include "rules.inc"
#undef T
#undef SFX
#undef SQRT
#undef POW
#undef TMIN

#define T double
#define SFX f64
#define SQRT sqrt
#define POW pow
#define TMIN DBL_MIN
#include "rules.inc"
#undef T
#undef SFX
#undef SQRT
#undef POW
#undef TMIN

enum { RULE_ADAM, RULE_ADAMW, RULE_FADAM, RULE_COUPLED, RULE_LION };

/* The number of state arrays each rule passes (the positions of its signature). */
static int state_count(int rule)
{
    return rule == RULE_LION ? 1 : 2;
}

/* One step on tensor i: th, g, s1, s2 are that tensor's θ, gradient and state arrays (s2 unused
 * by a rule with one). */
static void step_tensor(int rule, int coupled, Array *th, const Array *g, Array *s1, Array *s2,
                        const Hyper *h, long t)
{
    const long n = th->n;
    if (rule == RULE_LION) {
        if (th->f32)
            lion_tensor_f32(n, th->data, g->data, s1->data, h);
        else
            lion_tensor_f64(n, th->data, g->data, s1->data, h);
    } else if (rule == RULE_COUPLED && coupled) {
        const long V = th->shape[0], d = th->shape[1];
        if (th->f32)
            coupled_tensor_f32(V, d, th->data, g->data, s1->data, s2->data, h, t);
        else
            coupled_tensor_f64(V, d, th->data, g->data, s1->data, s2->data, h, t);
    } else if (rule == RULE_FADAM) {
        if (th->f32)
            fadam_tensor_f32(n, th->data, g->data, s1->data, s2->data, h, t);
        else
            fadam_tensor_f64(n, th->data, g->data, s1->data, s2->data, h, t);
    } else {
        const int decoupled = rule != RULE_ADAM;   /* AdamW, and Coupled Adam's uncoupled tensors */
        if (th->f32)
            adam_tensor_f32(n, th->data, g->data, s1->data, s2->data, h, t, decoupled);
        else
            adam_tensor_f64(n, th->data, g->data, s1->data, s2->data, h, t, decoupled);
    }
}

/* ======================================================================= checking */
/* ulp(e) = 2^(max(k, emin) − p + 1) for 2^k ≤ |e| < 2^(k+1); the smallest subnormal below that */
static double ulp(double e, int f32)
{
    const int p = f32 ? 24 : 53, emin = f32 ? -126 : -1022;
    int k;
    if (e == 0.0)
        return ldexp(1.0, emin - p + 1);
    frexp(fabs(e), &k);
    k -= 1;
    if (k < emin)
        k = emin;
    return ldexp(1.0, k - p + 1);
}

/* The largest |actual − expected| / allowed seen in the current file (--margins prints it). */
static double worst_ratio;
static char worst_where[200];
static const char *worst_case = "";

/* Compare an array with its expected value; on a mismatch, describe it in msg and return 0. */
static int check_array(const Array *got, const J *want_j, const J *tol, char *msg, size_t msglen,
                       const char *what)
{
    Array want;
    if (!read_array_as(want_j, &want, 1) || !tol) {
        snprintf(msg, msglen, "%s: unreadable expected value or tolerance", what);
        return 0;
    }
    int ok = 1;
    if (!want.f32 != !got->f32 || want.n != got->n) {
        snprintf(msg, msglen, "%s: dtype or size differs", what);
        ok = 0;
    }
    const double rtol = number(get(tol, "rtol")), atol = number(get(tol, "atol")), ulps = number(get(tol, "ulps"));
    for (long i = 0; ok && i < want.n; ++i) {
        const double a = elem(got, i), e = elem(&want, i);
        int bad;
        double allowed = 0.0;
        if (isnan(e) || isnan(a))
            bad = isnan(e) != isnan(a);
        else if (isinf(e) || isinf(a))
            bad = a != e;
        else {
            allowed = atol + rtol * fabs(e) + ulps * ulp(e, want.f32 != 0);
            bad = !(fabs(a - e) <= allowed);
            if (fabs(a - e) > 0 && fabs(a - e) / allowed > worst_ratio) {
                worst_ratio = fabs(a - e) / allowed;
                snprintf(worst_where, sizeof worst_where, "%s[%ld]", what, i);
            }
        }
        if (bad) {
            snprintf(msg, msglen, "%s[%ld]: actual %.17g expected %.17g (|diff| %.3g > %.3g)", what, i, a, e,
                     fabs(a - e), allowed);
            ok = 0;
        }
    }
    free(want.data);
    return ok;
}

/* ======================================================================= running a case */
static double hyper(const J *hp, const char *key, double fallback)
{
    const J *j = get(hp, key);
    return j ? number(j) : fallback;
}

/* Returns 1 pass, 0 fail, -1 skipped (not an optimizer case this runner implements). */
static int run_case(const J *c, char *msg, size_t msglen)
{
    const J *kind = get(c, "kind"), *fn = get(c, "function");
    if (!kind || kind->type != J_STR || strcmp(kind->str, "optimizer") || !fn || fn->type != J_STR)
        return -1;
    int rule;
    if (!strcmp(fn->str, "adam_step")) rule = RULE_ADAM;
    else if (!strcmp(fn->str, "adamw_step")) rule = RULE_ADAMW;
    else if (!strcmp(fn->str, "fadam_step")) rule = RULE_FADAM;
    else if (!strcmp(fn->str, "coupled_adam_step")) rule = RULE_COUPLED;
    else if (!strcmp(fn->str, "lion_step")) rule = RULE_LION;
    else return -1;
    const int ns = state_count(rule);

    const J *hp = get(c, "hyperparams"), *inputs = get(c, "inputs"), *expected = get(c, "expected");
    const J *order = get(c, "state_order"), *tol = get(c, "tolerance");
    const J *params_j = get(inputs, "params"), *state_j = get(inputs, "state"), *grads_j = get(inputs, "grads");
    const J *coupled_j = get(hp, "coupled");
    if (!params_j || !state_j || !grads_j || !order || order->n != ns || order->kid[0]->type != J_STR
        || order->kid[ns - 1]->type != J_STR || !expected || !tol) {
        snprintf(msg, msglen, "malformed case");
        return 0;
    }
    Hyper h = {hyper(hp, "lr", NAN), hyper(hp, "beta1", NAN), hyper(hp, "beta2", NAN), hyper(hp, "eps", NAN),
               hyper(hp, "weight_decay", 0.0), hyper(hp, "eps2", NAN), hyper(hp, "clip", NAN), hyper(hp, "p", NAN)};
    const long first = (long)number(get(inputs, "first_step"));
    const int nt = params_j->n;
    /* state by position; name2 is NULL for a rule with one state array */
    const char *name1 = order->kid[0]->str, *name2 = ns > 1 ? order->kid[1]->str : NULL;
    Array *th = xmalloc(sizeof(Array) * (size_t)nt), *s1 = xmalloc(sizeof(Array) * (size_t)nt),
          *s2 = xmalloc(sizeof(Array) * (size_t)nt);
    int ok = 1;
    for (int i = 0; i < nt; ++i) {
        memset(&s2[i], 0, sizeof s2[i]);
        ok &= read_array(at(params_j, i), &th[i]);
        ok &= read_array(at(get(state_j, name1), i), &s1[i]);
        if (name2)
            ok &= read_array(at(get(state_j, name2), i), &s2[i]);
    }
    if (!ok)
        snprintf(msg, msglen, "unreadable inputs");
    for (int k = 0; ok && k < grads_j->n; ++k) {
        const long t = first + k;
        for (int i = 0; ok && i < nt; ++i) {
            Array g;
            const J *flag = at(coupled_j, i);   /* Coupled Adam: coupled[i]; absent: all coupled */
            const int coupled = rule == RULE_COUPLED && (!coupled_j || (flag && flag->type == J_TRUE));
            if (!read_array(at(at(grads_j, k), i), &g)) {
                snprintf(msg, msglen, "unreadable gradient");
                ok = 0;
                break;
            }
            step_tensor(rule, coupled, &th[i], &g, &s1[i], &s2[i], &h, t);
            free(g.data);
        }
        const J *want = at(expected, k);
        char what[160];
        for (int i = 0; ok && i < nt; ++i) {
            snprintf(what, sizeof what, "step %ld params[%d]", t, i);
            ok = check_array(&th[i], at(get(want, "params"), i), at(get(tol, "params"), i), msg, msglen, what);
            snprintf(what, sizeof what, "step %ld state.%s[%d]", t, name1, i);
            ok = ok && check_array(&s1[i], at(get(get(want, "state"), name1), i),
                                   at(get(get(tol, "state"), name1), i), msg, msglen, what);
            if (name2) {
                snprintf(what, sizeof what, "step %ld state.%s[%d]", t, name2, i);
                ok = ok && check_array(&s2[i], at(get(get(want, "state"), name2), i),
                                       at(get(get(tol, "state"), name2), i), msg, msglen, what);
            }
        }
    }
    for (int i = 0; i < nt; ++i) {
        free(th[i].data);
        free(s1[i].data);
        free(s2[i].data);
    }
    free(th);
    free(s1);
    free(s2);
    return ok;
}

/* Does this build keep subnormal numbers (no flush-to-zero, no denormals-are-zero)? */
static int keeps_subnormals(void)
{
    volatile float f = FLT_MIN, two_f = 2.0f;
    volatile double d = DBL_MIN, two_d = 2.0;
    volatile float fs = f / two_f;
    volatile double ds = d / two_d;
    return fs != 0.0f && ds != 0.0 && fs * two_f == f && ds * two_d == d;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    size_t cap = 1 << 20, n = 0, got;
    char *buf = xmalloc(cap);
    while ((got = fread(buf + n, 1, cap - n, fp)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            buf = xrealloc(buf, cap);
        }
    }
    fclose(fp);
    *len = n;
    return buf;
}

int main(int argc, char **argv)
{
    int failed_any = 0, margins = 0, first = 1;
    if (argc > 1 && !strcmp(argv[1], "--margins")) {
        margins = 1;
        first = 2;
    }
    if (argc <= first) {
        fprintf(stderr, "usage: %s [--margins] spec/vectors/<suite>.json ...\n", argv[0]);
        return 2;
    }
    if (!keeps_subnormals()) {
        /* spec/conventions.md: no flush-to-zero. Checks of float64 subnormals cannot be trusted
         * in this mode either (the comparison itself would flush them), so this is a failure. */
        printf("FAIL environment: subnormal numbers are flushed to zero (FTZ/DAZ, e.g. -ffast-math)\n");
        failed_any = 1;
    }
    for (int a = first; a < argc; ++a) {
        size_t len;
        char *text = read_file(argv[a], &len);
        if (!text) {
            fprintf(stderr, "%s: cannot read\n", argv[a]);
            return 2;
        }
        Parser ps = {text, text + len, NULL};
        J *root = parse_value(&ps);
        if (ps.err) {
            fprintf(stderr, "%s: JSON error: %s at byte %ld\n", argv[a], ps.err, (long)(ps.p - text));
            return 2;
        }
        const J *format = get(root, "format"), *version = get(root, "version"), *suite = get(root, "suite");
        const J *cases = get(root, "cases");
        if (!format || format->type != J_STR || strcmp(format->str, "fisheropt-vectors") || number(version) != 2
            || !cases || cases->type != J_ARR || !suite || suite->type != J_STR) {
            fprintf(stderr, "%s: not a fisheropt-vectors file of format version 2\n", argv[a]);
            return 2;
        }
        int passed = 0, failed = 0, skipped = 0;
        worst_ratio = 0.0;
        worst_where[0] = 0;
        worst_case = "";
        for (int i = 0; i < cases->n; ++i) {
            char msg[512] = "";
            const J *name = get(cases->kid[i], "name");
            const double before = worst_ratio;
            const int r = run_case(cases->kid[i], msg, sizeof msg);
            if (worst_ratio > before)
                worst_case = name && name->type == J_STR ? name->str : "?";
            if (r < 0) {
                skipped++;
            } else if (r) {
                passed++;
            } else {
                failed++;
                printf("FAIL %s/%s: %s\n", suite->str, name && name->type == J_STR ? name->str : "?", msg);
            }
        }
        printf("%s: %d/%d cases passed (%d skipped)\n", suite->str, passed, passed + failed, skipped);
        if (margins)
            printf("  largest |actual - expected| / allowed: %.3g (%s %s)\n", worst_ratio, worst_case, worst_where);
        failed_any |= failed > 0;
        free_json(root);
        free(text);
    }
    return failed_any ? 1 : 0;
}
