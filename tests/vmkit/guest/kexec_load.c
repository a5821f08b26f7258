/* Load a crash (capture) kernel with kexec_file_load(2), flag KEXEC_FILE_ON_CRASH.
 *
 * usage: kexec-load KERNEL INITRD CMDLINE
 * Debian's kexec binary needs the Xen libraries; this static helper needs nothing.
 * Built by tests/vmkit/sample.py with gcc -static at sample generation time.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_kexec_file_load
#define SYS_kexec_file_load 320 /* x86_64 */
#endif
#define KEXEC_FILE_ON_CRASH 0x2UL

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s KERNEL INITRD CMDLINE\n", argv[0]);
		return 2;
	}
	int kfd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (kfd < 0) {
		fprintf(stderr, "kexec-load: open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	int ifd = open(argv[2], O_RDONLY | O_CLOEXEC);
	if (ifd < 0) {
		fprintf(stderr, "kexec-load: open %s: %s\n", argv[2], strerror(errno));
		return 1;
	}
	const char *cmdline = argv[3];
	/* The length passed includes the terminating NUL. */
	long rc = syscall(SYS_kexec_file_load, kfd, ifd, strlen(cmdline) + 1, cmdline,
			  KEXEC_FILE_ON_CRASH);
	if (rc != 0) {
		fprintf(stderr, "kexec-load: kexec_file_load failed: %s\n", strerror(errno));
		return 1;
	}
	printf("kexec-load: capture kernel loaded\n");
	return 0;
}
