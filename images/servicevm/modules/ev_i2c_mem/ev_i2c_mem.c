// SPDX-License-Identifier: GPL-2.0
/*
 * ev_i2c_mem: an I2C adapter whose only device is a 256-byte memory at address `addr`
 * (default 0x52), with an EEPROM-like address pointer: a write's first byte sets it, the
 * following bytes are stored from there on, a read returns bytes from it on; it wraps at
 * 256 and survives between transfers. Unlike i2c-stub (SMBus only) it implements
 * master_xfer, so user space can use I2C_RDWR with several messages (repeated starts) as
 * on most SoC I2C controllers. Any other address NACKs (-ENXIO). The i2c core serialises
 * transfers on an adapter, so the state needs no lock of its own.
 */
#include <linux/i2c.h>
#include <linux/module.h>
#include <linux/string.h>

static unsigned short addr = 0x52;
module_param(addr, ushort, 0444);
MODULE_PARM_DESC(addr, "7-bit address of the memory (0x03..0x77)");

static u8 mem[256];
static u8 pointer;

static int ev_xfer(struct i2c_adapter *adap, struct i2c_msg *msgs, int num)
{
	int i, k;

	for (i = 0; i < num; i++) {
		struct i2c_msg *m = &msgs[i];

		if (m->addr != addr || (m->flags & I2C_M_TEN))
			return -ENXIO;
		if (m->flags & I2C_M_RD) {
			for (k = 0; k < m->len; k++)
				m->buf[k] = mem[pointer++];
		} else if (m->len) {
			pointer = m->buf[0];
			for (k = 1; k < m->len; k++)
				mem[pointer++] = m->buf[k];
		}
	}
	return num;
}

static u32 ev_functionality(struct i2c_adapter *adap)
{
	return I2C_FUNC_I2C | I2C_FUNC_SMBUS_EMUL;
}

static const struct i2c_algorithm ev_algo = {
	.master_xfer = ev_xfer,
	.functionality = ev_functionality,
};

static struct i2c_adapter ev_adapter = {
	.owner = THIS_MODULE,
	.algo = &ev_algo,
	.name = "edgevirt i2c memory",
};

static int __init ev_init(void)
{
	if (addr < 0x03 || addr > 0x77)
		return -EINVAL;
	memset(mem, 0xff, sizeof(mem));
	return i2c_add_adapter(&ev_adapter);
}

static void __exit ev_exit(void)
{
	i2c_del_adapter(&ev_adapter);
}

module_init(ev_init);
module_exit(ev_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("edgevirt: a plain-I2C adapter with a 256-byte memory");
