/* ev-vsock: the guest side of edgevirt's vsock smoke test (busybox has no AF_VSOCK).
 *
 *   ev-vsock connect CID PORT   connect, copy stdin to the socket, shut down writing,
 *                               copy the socket to stdout until the peer closes
 *   ev-vsock listen PORT        accept one connection, then the same
 *
 * Freestanding aarch64 (raw system calls, no libc): the cross compiler alone builds it,
 * without arm64 libc headers. Exit 0 on success; 1 with "connect: errno N" (ECONNRESET is
 * 104) or another failure on stderr; 2 on a usage error.
 */
#define SYS_close 57
#define SYS_read 63
#define SYS_write 64
#define SYS_exit 93
#define SYS_socket 198
#define SYS_bind 200
#define SYS_listen 201
#define SYS_accept 202
#define SYS_connect 203
#define SYS_shutdown 210
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SHUT_WR 1
#define VMADDR_CID_ANY 0xFFFFFFFFu

struct sockaddr_vm {
	unsigned short family, reserved1;
	unsigned int port, cid;
	unsigned char flags, zero[3];
};

static long sys(long n, long a, long b, long c)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	__asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory", "cc");
	return x0;
}

static char buf[65536];

static long len(const char *s)
{
	long n = 0;
	while (s[n])
		n++;
	return n;
}

static void put(int fd, const char *s) { sys(SYS_write, fd, (long)s, len(s)); }

static void fail(const char *what, long err)
{
	char num[24];
	int i = sizeof(num) - 1;
	unsigned long v = (unsigned long)-err;
	num[i] = 0;
	do {
		num[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	put(2, what);
	put(2, ": errno ");
	put(2, num + i);
	put(2, "\n");
	sys(SYS_exit, 1, 0, 0);
}

static unsigned long number(const char *s)
{
	unsigned long v = 0;
	if (!*s)
		sys(SYS_exit, 2, 0, 0);
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			sys(SYS_exit, 2, 0, 0);
		v = v * 10 + (unsigned long)(*s - '0');
	}
	return v;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static void copy(int from, int to, const char *what)
{
	for (;;) {
		long n = sys(SYS_read, from, (long)buf, sizeof(buf));
		if (n == 0)
			return;
		if (n < 0)
			fail(what, n);
		for (long off = 0; off < n;) {
			long w = sys(SYS_write, to, (long)(buf + off), n - off);
			if (w <= 0)
				fail(what, w ? w : -5);
			off += w;
		}
	}
}

long cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	struct sockaddr_vm sa = {0};
	long s, r;

	sa.family = AF_VSOCK;
	if (argc == 4 && streq(argv[1], "connect")) {
		sa.cid = (unsigned int)number(argv[2]);
		sa.port = (unsigned int)number(argv[3]);
		s = sys(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
		if (s < 0)
			fail("socket", s);
		r = sys(SYS_connect, s, (long)&sa, sizeof(sa));
		if (r < 0)
			fail("connect", r);
	} else if (argc == 3 && streq(argv[1], "listen")) {
		long l = sys(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
		sa.cid = VMADDR_CID_ANY;
		sa.port = (unsigned int)number(argv[2]);
		if (l < 0)
			fail("socket", l);
		r = sys(SYS_bind, l, (long)&sa, sizeof(sa));
		if (r < 0)
			fail("bind", r);
		r = sys(SYS_listen, l, 1, 0);
		if (r < 0)
			fail("listen", r);
		put(1, "");
		s = sys(SYS_accept, l, 0, 0);
		if (s < 0)
			fail("accept", s);
		sys(SYS_close, l, 0, 0);
	} else {
		put(2, "usage: ev-vsock connect CID PORT | ev-vsock listen PORT\n");
		sys(SYS_exit, 2, 0, 0);
		return 2;
	}
	copy(0, (int)s, "send");
	sys(SYS_shutdown, s, SHUT_WR, 0);
	copy((int)s, 1, "receive");
	sys(SYS_exit, 0, 0, 0);
	return 0;
}

__asm__(".global _start\n_start:\n\tmov x0, sp\n\tbl cmain\n\tmov x8, 93\n\tsvc 0\n");
