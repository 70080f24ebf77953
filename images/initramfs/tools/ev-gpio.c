/* ev-gpio: the guest side of edgevirt's GPIO tests, on the GPIO character device (v2 uAPI)
 * (busybox has no gpio applet; sysfs GPIO is deprecated and off in this kernel).
 *
 *   ev-gpio info CHIP                      "label=L lines=N", then "OFFSET NAME" per line
 *   ev-gpio drive CHIP OFFSET VALUE MS     request the line as an output at VALUE, print
 *                                          "driving", hold it MS milliseconds, release
 *   ev-gpio get CHIP OFFSET                request it as an input, print its value
 *   ev-gpio wait CHIP OFFSET EDGE MS       EDGE rising|falling|both: request the line as an
 *                                          input with edge detection, print "waiting", then
 *                                          "event rising|falling" on the first edge (exit 0)
 *                                          or "timeout" after MS milliseconds (exit 1)
 *
 * Freestanding aarch64 (raw system calls, no libc), like ev-vsock. Exit 1 with
 * "WHAT: errno N" on a failed call, 2 on a usage error.
 */
#define SYS_openat 56
#define SYS_close 57
#define SYS_read 63
#define SYS_write 64
#define SYS_ppoll 73
#define SYS_exit 93
#define SYS_nanosleep 101
#define SYS_ioctl 29
#define AT_FDCWD -100
#define O_RDWR 2
#define POLLIN 1

#define GPIO_GET_CHIPINFO_IOCTL 0x8044B401ul
#define GPIO_V2_GET_LINEINFO_IOCTL 0xC100B405ul
#define GPIO_V2_GET_LINE_IOCTL 0xC250B407ul
#define GPIO_V2_LINE_GET_VALUES_IOCTL 0xC010B40Eul
#define FLAG_INPUT (1u << 2)
#define FLAG_OUTPUT (1u << 3)
#define FLAG_EDGE_RISING (1u << 4)
#define FLAG_EDGE_FALLING (1u << 5)
#define ATTR_ID_OUTPUT_VALUES 2
#define EVENT_RISING_EDGE 1

static long sys(long n, long a, long b, long c, long d)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	register long x3 __asm__("x3") = d;
	__asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory", "cc");
	return x0;
}

/* Static buffers: the ELF loader hands them over zeroed (no memset in a freestanding build). */
static unsigned char chipinfo[68];
static unsigned char lineinfo[256];
static unsigned char request[592];
static unsigned char values[16];
static unsigned char event[48 * 4];

static long len(const char *s)
{
	long n = 0;
	while (s[n])
		n++;
	return n;
}

static void put(int fd, const char *s) { sys(SYS_write, fd, (long)s, len(s), 0); }

static void putnum(int fd, unsigned long v)
{
	char num[24];
	int i = sizeof(num) - 1;
	num[i] = 0;
	do {
		num[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	put(fd, num + i);
}

static void fail(const char *what, long err)
{
	put(2, what);
	put(2, ": errno ");
	putnum(2, (unsigned long)-err);
	put(2, "\n");
	sys(SYS_exit, 1, 0, 0, 0);
}

static void usage(void)
{
	put(2, "usage: ev-gpio info CHIP | drive CHIP OFFSET VALUE MS | get CHIP OFFSET | "
	       "wait CHIP OFFSET rising|falling|both MS\n");
	sys(SYS_exit, 2, 0, 0, 0);
}

static unsigned long number(const char *s)
{
	unsigned long v = 0;
	if (!*s)
		usage();
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			usage();
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

static void st32(unsigned char *p, unsigned int v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static void st64(unsigned char *p, unsigned long v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static unsigned int ld32(const unsigned char *p)
{
	return (unsigned int)p[0] | (unsigned int)p[1] << 8 | (unsigned int)p[2] << 16 |
	       (unsigned int)p[3] << 24;
}

static long open_chip(const char *path)
{
	long fd = sys(SYS_openat, AT_FDCWD, (long)path, O_RDWR, 0);
	if (fd < 0)
		fail("open", fd);
	return fd;
}

/* struct gpio_v2_line_request for one line; returns the line's fd. */
static long request_line(long chip, unsigned int offset, unsigned long flags, long value)
{
	static const char consumer[] = "ev-gpio";
	st32(request + 0, offset);
	for (int i = 0; consumer[i]; i++)
		request[256 + i] = (unsigned char)consumer[i];
	st64(request + 288, flags);
	if (value >= 0) {
		st32(request + 296, 1);			  /* num_attrs */
		st32(request + 320, ATTR_ID_OUTPUT_VALUES); /* attrs[0].attr.id */
		st64(request + 328, (unsigned long)value);   /* attrs[0].attr.values */
		st64(request + 336, 1);			  /* attrs[0].mask */
	}
	st32(request + 560, 1); /* num_lines */
	long r = sys(SYS_ioctl, chip, (long)GPIO_V2_GET_LINE_IOCTL, (long)request, 0);
	if (r < 0)
		fail("GPIO_V2_GET_LINE_IOCTL", r);
	return (long)(int)ld32(request + 588);
}

static void sleep_ms(unsigned long ms)
{
	long ts[2] = {(long)(ms / 1000), (long)(ms % 1000) * 1000000};
	sys(SYS_nanosleep, (long)ts, 0, 0, 0);
}

long cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	long chip, fd, r;

	if (argc < 3)
		usage();
	if (argc == 3 && streq(argv[1], "info")) {
		chip = open_chip(argv[2]);
		r = sys(SYS_ioctl, chip, (long)GPIO_GET_CHIPINFO_IOCTL, (long)chipinfo, 0);
		if (r < 0)
			fail("GPIO_GET_CHIPINFO_IOCTL", r);
		chipinfo[63] = 0;
		put(1, "label=");
		put(1, (const char *)chipinfo + 32);
		put(1, " lines=");
		putnum(1, ld32(chipinfo + 64));
		put(1, "\n");
		for (unsigned int i = 0; i < ld32(chipinfo + 64); i++) {
			for (int k = 0; k < 256; k++)
				lineinfo[k] = 0;
			st32(lineinfo + 64, i);
			r = sys(SYS_ioctl, chip, (long)GPIO_V2_GET_LINEINFO_IOCTL, (long)lineinfo, 0);
			if (r < 0)
				fail("GPIO_V2_GET_LINEINFO_IOCTL", r);
			lineinfo[31] = 0;
			putnum(1, i);
			put(1, " ");
			put(1, (const char *)lineinfo);
			put(1, "\n");
		}
		sys(SYS_exit, 0, 0, 0, 0);
	}
	if (argc < 4)
		usage();
	chip = open_chip(argv[2]);
	unsigned int offset = (unsigned int)number(argv[3]);
	if (argc == 6 && streq(argv[1], "drive")) {
		fd = request_line(chip, offset, FLAG_OUTPUT, (long)(number(argv[4]) & 1));
		put(1, "driving\n");
		sleep_ms(number(argv[5]));
		sys(SYS_close, fd, 0, 0, 0);
		sys(SYS_exit, 0, 0, 0, 0);
	}
	if (argc == 4 && streq(argv[1], "get")) {
		fd = request_line(chip, offset, FLAG_INPUT, -1);
		st64(values + 8, 1); /* mask */
		r = sys(SYS_ioctl, fd, (long)GPIO_V2_LINE_GET_VALUES_IOCTL, (long)values, 0);
		if (r < 0)
			fail("GPIO_V2_LINE_GET_VALUES_IOCTL", r);
		putnum(1, values[0] & 1);
		put(1, "\n");
		sys(SYS_exit, 0, 0, 0, 0);
	}
	if (argc == 6 && streq(argv[1], "wait")) {
		unsigned long flags = FLAG_INPUT;
		if (streq(argv[4], "rising"))
			flags |= FLAG_EDGE_RISING;
		else if (streq(argv[4], "falling"))
			flags |= FLAG_EDGE_FALLING;
		else if (streq(argv[4], "both"))
			flags |= FLAG_EDGE_RISING | FLAG_EDGE_FALLING;
		else
			usage();
		unsigned long ms = number(argv[5]);
		fd = request_line(chip, offset, flags, -1);
		put(1, "waiting\n");
		struct {
			int fd;
			short events, revents;
		} pfd = {(int)fd, POLLIN, 0};
		long ts[2] = {(long)(ms / 1000), (long)(ms % 1000) * 1000000};
		r = sys(SYS_ppoll, (long)&pfd, 1, (long)ts, 0);
		if (r < 0)
			fail("ppoll", r);
		if (r == 0) {
			put(1, "timeout\n");
			sys(SYS_exit, 1, 0, 0, 0);
		}
		r = sys(SYS_read, fd, (long)event, sizeof(event), 0);
		if (r < 48)
			fail("read event", r < 0 ? r : -5);
		put(1, ld32(event + 8) == EVENT_RISING_EDGE ? "event rising\n" : "event falling\n");
		sys(SYS_exit, 0, 0, 0, 0);
	}
	usage();
	return 2;
}

__asm__(".global _start\n_start:\n\tmov x0, sp\n\tbl cmain\n\tmov x8, 93\n\tsvc 0\n");
